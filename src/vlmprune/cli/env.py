"""`vlmprune env`: the versions that matter and a two-second self-check, to paste into a bug report."""

from __future__ import annotations

import argparse
import json

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "env",
        help="print the versions that matter and check that pruning is right on this install",
        description=(
            "Print vlmprune's, torch's, transformers' and the optional integrations' versions and the CUDA device, "
            "then check on a tiny random LLaVA that pruned forward and generation equal the masked reference. "
            "Paste the output into bug reports. Exit status 1 if a check fails."
        ),
    )
    parser.add_argument("--no-check", action="store_true", help="print the versions only")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vlmprune.selfcheck import declared_range, run_self_check, versions

    found = versions()
    supported = declared_range("transformers")
    checks = [] if args.no_check else run_self_check()
    if args.json:
        report = {"versions": found, "supported_transformers": supported}
        report["checks"] = [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks]
        print(json.dumps(report, indent=2))
    else:
        width = max(map(len, found))
        for name, version in found.items():
            note = f"  (vlmprune supports {supported})" if name == "transformers" and supported else ""
            print(f"{name:<{width}}  {version}{note}")
        for check in checks:
            print(
                f"self-check: {check.name}: {'ok' if check.ok else 'FAILED'}"
                + (f" ({check.detail})" * bool(check.detail))
            )
    return 0 if all(check.ok for check in checks) else 1
