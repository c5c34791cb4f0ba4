"""vlmprune on the transformers a user has: the cache found by type, renames caught at install, clear errors,
optional integrations that fail in one line, checkpoints every supported release reads, and `vlmprune env`."""

from __future__ import annotations

import inspect
import json
import sys

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import DynamicCache, LlavaForConditionalGeneration

import vlmprune
from vlmprune.cli.main import main
from vlmprune.engine.compat import find_cache
from vlmprune.engine.layout import attention_mask_for
from vlmprune.extras import import_extra
from vlmprune.selfcheck import run_self_check
from vlmprune.testing import save_tiny_llava

# What the installed transformers calls the cache argument (5.24 renamed `past_key_values` to `cache`).
CACHE_ARGUMENT = (
    "cache" if "cache" in inspect.signature(LlavaForConditionalGeneration.forward).parameters else ("past_key_values")
)
PROMPTS = ["what is the color of the large object on the left", "where is the cat"]


def test_the_cache_is_found_whatever_its_argument_is_called():
    cache = DynamicCache()
    assert find_cache({"past_key_values": cache}) is cache
    assert find_cache({"cache": cache, "use_cache": True}) is cache
    assert find_cache((), {"hidden": torch.zeros(1)}, (1, cache)) is cache
    assert find_cache({"cache": None}, None) is None


def test_manual_decoding_from_the_cache_of_a_pruned_forward_equals_generate(models, make_inputs):
    """A forward with use_cache makes its cache inside the decoder stack; decoding from it must stay pruned."""
    model, inputs = models["sdpa"], make_inputs(PROMPTS)
    method = vlmprune.build_method("fastv", ratio=0.75)
    with torch.no_grad(), vlmprune.prune(model, method):
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, -4:]
        out = model(**inputs, use_cache=True)
        mask, tokens = inputs["attention_mask"], [out.logits[:, -1].argmax(-1, keepdim=True)]
        positions = mask.sum(dim=1, keepdim=True) - 1
        for _ in range(3):
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)
            positions = positions + 1
            step = {"input_ids": tokens[-1], "attention_mask": mask, "position_ids": positions}
            out = model(**step, **{CACHE_ARGUMENT: find_cache(out)})
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    assert torch.equal(torch.cat(tokens, dim=1), expected)


def test_a_decode_step_on_a_cache_vlmprune_never_filled_is_a_clear_error(models, make_inputs):
    model, inputs = models["sdpa"], make_inputs(PROMPTS[:1])
    with torch.no_grad():
        out = model(**inputs, use_cache=True)  # prefilled outside vlmprune: the cache is not pruned
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
        with (
            pytest.raises(
                vlmprune.VlmpruneError, match=rf"its last prefill did not fill.*transformers {transformers.__version__}"
            ),
            vlmprune.prune(model, vlmprune.build_method("fastv")),
        ):
            model(input_ids=next_token, **{CACHE_ARGUMENT: find_cache(out)})


def test_a_decoder_layer_that_no_longer_takes_an_argument_fails_at_install(models, monkeypatch):
    """As if transformers renamed `position_embeddings`: refuse to install rather than prune silently wrong."""
    model = models["sdpa"]
    layer = model.model.language_model.layers[0]

    def renamed_forward(hidden_states, attention_mask=None, position_ids=None, rope=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(layer, "forward", renamed_forward)
    with (
        pytest.raises(vlmprune.UnsupportedModelError, match=r"no position_embeddings argument in transformers 5\."),
        vlmprune.prune(model, vlmprune.build_method("fastv")),
    ):
        pass


def test_masks_take_each_backend_format():
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])

    class Config:
        _attn_implementation = "eager"

    config = Config()
    eager = attention_mask_for(config, valid, 2, torch.float32, padded=True)
    assert eager.shape == (2, 1, 2, 4) and eager.dtype == torch.float32
    assert eager[0, 0, 0].tolist() == [torch.finfo(torch.float32).min, 0.0, 0.0, torch.finfo(torch.float32).min]
    config._attn_implementation = "sdpa"
    assert (
        attention_mask_for(config, valid[1:], 4, torch.float32, padded=False) is None
    )  # plain causal: sdpa's is_causal path
    assert attention_mask_for(config, valid, 2, torch.float32, padded=True)[0, 0].tolist() == [
        [False, True, True, False],
        [False, True, True, True],
    ]
    assert attention_mask_for(config, valid[1:], 4, torch.float32, padded=None).shape == (1, 1, 4, 4)  # unknown
    config._attn_implementation = "flash_attention_2"
    assert attention_mask_for(config, valid[1:], 4, torch.float32, padded=False) is None
    assert torch.equal(attention_mask_for(config, valid, 2, torch.float32, padded=True), valid)
    config._attn_implementation = "flex_attention"
    with pytest.raises(vlmprune.VlmpruneError, match="'flex_attention' is not supported"):
        attention_mask_for(config, valid, 2, torch.float32, padded=True)


def test_a_missing_extra_is_one_error_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    with pytest.raises(vlmprune.MissingExtraError, match=r"reading parquet needs pyarrow, which is not installed; .*"):
        import_extra("pyarrow.parquet", "reading parquet")


def test_eval_on_parquet_without_pyarrow_exits_2_with_one_line(monkeypatch, tmp_path, capsys, small_model_dir):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val-00000.parquet").write_bytes(b"")  # the lmms-lab layout
    data, out = f"refcoco={tmp_path / 'data'}", str(tmp_path / "run")
    code = main(["eval", "--model", small_model_dir, "--tasks", "refcoco", "--data", data, "--out", out])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "pyarrow" in err and "pip install" in err


def test_saved_weights_are_in_the_hub_layout_and_load_back(tmp_path, models):
    path = save_tiny_llava(tmp_path / "model")
    with safe_open(f"{path}/model.safetensors", "pt") as weights:
        prefixes = {key.split(".")[0] + "." + key.split(".")[1] for key in weights.keys()}  # noqa: SIM118
    assert prefixes == {
        "vision_tower.vision_model",
        "language_model.model",
        "language_model.lm_head",
        "multi_modal_projector.linear_1",
        "multi_modal_projector.linear_2",
    }
    _, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_a_testbed_checkpoint_that_does_not_load_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from vlmprune.testbed.model import build_testbed_model, load_testbed, save_testbed

    path = save_testbed(build_testbed_model(), tmp_path / "tb")
    weights = load_file(f"{path}/model.safetensors")
    weights["renamed.weight"] = weights.pop(next(iter(weights)))
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(vlmprune.VlmpruneError, match=r"does not match transformers .*2 weights missing or unexpected"):
        load_testbed(path)


def test_env_prints_versions_and_passes_its_self_check(capsys):
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["transformers"] == transformers.__version__
    assert report["supported_transformers"].startswith(">=5.")
    assert len(report["checks"]) == 4 and all(check["ok"] for check in report["checks"])


def test_the_self_check_reports_a_broken_engine_instead_of_crashing(monkeypatch):
    """The bug of transformers 5.24: the engine missed the cache, so each decode step looked like a prefill."""
    monkeypatch.setattr("vlmprune.engine.session.find_cache", lambda *containers: None)
    results = run_self_check()
    assert results and not any(result.ok for result in results)
    assert all("NoImageTokensError" in result.detail for result in results)
