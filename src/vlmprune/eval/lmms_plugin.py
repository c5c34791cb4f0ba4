"""An lmms-eval model that runs a transformers VLM under any vlmprune method.

Registered through lmms-eval's `lmms_eval.models` entry point (see pyproject.toml), so with vlmprune installed

    lmms-eval --model vlmprune --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=feather,ratio=0.7 \\
        --tasks gqa,pope,textvqa --batch_size 8

runs every lmms-eval task pruned. `model_args` other than the loader's (pretrained, method, device, dtype,
attn_implementation, max_new_tokens) are the method's parameters. Generation is greedy unless the task asks
otherwise; `loglikelihood` scores continuations with the same pruned prefill.
"""

from __future__ import annotations

import ast
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from vlmprune.engine import prune
from vlmprune.methods import build_method

__all__ = ["MANIFEST", "VlmpruneLMM"]

MANIFEST = ModelManifest(model_id="vlmprune", simple_class_path="vlmprune.eval.lmms_plugin.VlmpruneLMM")

_LOADER_ARGS = {"pretrained", "method", "device", "dtype", "attn_implementation", "max_new_tokens", "batch_size"}


def _literal(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


class VlmpruneLMM(lmms):
    """lmms-eval's interface around `vlmprune.prune(model, method)`."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str = "none",
        device: str = "cpu",
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        batch_size: int | str = 1,
        max_new_tokens: int = 128,
        **method_params: Any,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.model = (
            AutoModelForImageTextToText.from_pretrained(
                pretrained, dtype=torch_dtype, attn_implementation=attn_implementation
            )
            .to(device)
            .eval()
        )
        method_object = (
            None if method == "none" else build_method(method, **{k: _literal(v) for k, v in method_params.items()})
        )
        self._attach(self.model, self.processor, method_object, batch_size, max_new_tokens)

    @classmethod
    def from_model(cls, model: torch.nn.Module, processor: Any, method: Any, batch_size: int = 1) -> VlmpruneLMM:
        """Wraps an already loaded model and processor (no second load)."""
        self = cls.__new__(cls)
        lmms.__init__(self)
        self._attach(model.eval(), processor, method, batch_size, 128)
        return self

    def _attach(self, model, processor, method, batch_size: int | str, max_new_tokens: int) -> None:
        self.model, self.processor, self.method = model, processor, method
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.device = next(model.parameters()).device
        self.last_traces: list[dict] = []  # one per generated batch: what the method kept

    def _scope(self):
        from contextlib import nullcontext

        return prune(self.model, self.method) if self.method is not None else nullcontext(None)

    def _prompt(self, context: str, n_images: int) -> str:
        token = getattr(self.processor, "image_token", "<image>")
        if token not in context and n_images:
            context = "\n".join([token] * n_images) + "\n" + context
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "text", "text": context}]
            return self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        return f"USER: {context} ASSISTANT:"

    def _inputs(self, texts: list[str], visuals: list[list]) -> dict:
        """Processor inputs for prompts already in the chat format."""
        images = [img.convert("RGB") for v in visuals for img in v]
        inputs = self.processor(images=images or None, text=texts, return_tensors="pt", padding=True).to(self.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _visuals(self, request: Instance) -> list:
        doc_to_visual, doc_id, task, split = request.args[2:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        return [v for v in visuals if v is not None]

    @torch.inference_mode()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            batch = requests[start : start + self.batch_size_per_gpu]
            contexts = [r.args[0] for r in batch]
            kwargs = dict(batch[0].args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            generate = {
                "max_new_tokens": int(kwargs.get("max_new_tokens", self.max_new_tokens)),
                "do_sample": float(kwargs.get("temperature", 0) or 0) > 0,
            }
            visuals = [self._visuals(r) for r in batch]
            texts = [self._prompt(c, len(v)) for c, v in zip(contexts, visuals, strict=True)]
            inputs = self._inputs(texts, visuals)
            with self._scope() as trace:
                output = self.model.generate(**inputs, **generate)
                if trace is not None:
                    self.last_traces.append(trace.to_dict())
            texts = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for text in texts:
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                answers.append(text.strip())
        return answers

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = request.args[0], request.args[1]
            visuals = self._visuals(request) if len(request.args) > 2 else []
            text = self._prompt(context, len(visuals))
            prompt = self._inputs([text], [visuals])
            full = self._inputs([text + continuation], [visuals])
            n_prompt = prompt["input_ids"].shape[1]
            with self._scope():
                logits = self.model(**full).logits[0].float()
            target = full["input_ids"][0, n_prompt:]
            # a pruned forward returns fewer rows; the continuation's rows are always the last ones
            predicted = logits[-target.numel() - 1 : -1].log_softmax(dim=-1)
            picked = predicted.gather(1, target[:, None]).squeeze(1)
            results.append((float(picked.sum()), bool((predicted.argmax(dim=-1) == target).all())))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("multi-round generation is not supported by the vlmprune lmms-eval model")
