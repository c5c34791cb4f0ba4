"""An independent reference for pruned runs: the unpruned model with the dropped tokens masked out.

It never gathers rows or touches the cache: every layer runs on the whole sequence, and from each stage's
layer on the tokens that stage dropped are hidden from every query by the attention mask. With renumbered
positions, the tokens still alive at a layer get positions 0, 1, 2, ... in order. The tests and `vlmprune env`'s
self-check compare pruned runs against it; it runs the eager and sdpa backends, on CPU tensors.

For a method that prunes once before the language model (a stage at layer 0) there is a second, more direct
reference (`pre_llm_logits`, `pre_llm_greedy`): the unmodified language model run, one sample at a time and
with no hook on it, on only the input embeddings the method kept, with the positions it defines.

Positions: a family whose forward derives its own positions from the prompt (`ModelAdapter.computes_positions`,
M-RoPE's 3-D positions) gets none from the references, so the model's own are the original ones; others get
`generate`'s, from the attention mask. Renumbered positions are each alive token's rank, on every M-RoPE axis.
Per-token additions to the first layers' outputs (Qwen3-VL's DeepStack) are made by the model itself: in full in
the masked reference, and for the kept tokens only in the pre-LLM one.

A merging stage before the language model (its trace has `sources`) keeps tokens whose states are weighted sums
of original tokens: both references compute each such state from the trace's sources and weights (over the input
embeddings, or over the vision features before the projector, projected again) and put it in place of its
token's input embedding; the language model itself runs unmodified. A merging stage inside the language model
(`merge_space="hidden"`, SparseVLM's recycling) does the same in the masked reference at its layer: each merged
token's hidden state entering that layer becomes the weighted sum of its sources' states there.
"""

from __future__ import annotations

import torch

from vlmprune.adapters import get_adapter
from vlmprune.trace import Trace

__all__ = [
    "alive_per_layer",
    "positions_from_mask",
    "pre_llm_greedy",
    "pre_llm_logits",
    "reference_greedy",
    "reference_logits",
]


def alive_per_layer(model, inputs: dict, trace: Trace) -> list[torch.Tensor]:
    """Per decoder layer, (batch, seq) bool: tokens not padding and not dropped by a stage at or before it.

    `inputs` are the processor's (`input_ids`, `attention_mask` and the images' arguments)."""
    adapter = get_adapter(model)
    attention_mask = inputs["attention_mask"]
    image = adapter.image_token_mask(inputs)
    image_id = torch.where(image, image.long().cumsum(1) - 1, -1)
    valid = attention_mask.bool()
    alive, current = [], valid.clone()
    stages = {stage.layer: stage for stage in trace.stages}
    for layer in range(adapter.num_layers):
        if layer in stages:
            current = valid.clone()
            for b, kept in enumerate(stages[layer].kept):
                keep_image = torch.zeros(int(image[b].sum()), dtype=torch.bool, device=image.device)
                keep_image[kept.to(image.device)] = True
                current[b] &= ~image[b] | keep_image[image_id[b].clamp(min=0)]
        alive.append(current.clone())
    return alive


def _merging_stage(trace: Trace):
    """The trace's merging stage before the language model, or None (later ones: `_merging_in_layers`)."""
    merging = [stage for stage in trace.stages if stage.sources is not None]
    if any(stage.layer > 0 and stage.merge_space != "hidden" for stage in merging):
        raise ValueError("the references merge inside the language model only in its hidden states")
    return merging[0] if merging and merging[0].layer == 0 else None


def _merging_in_layers(model, inputs: dict, trace: Trace) -> list:
    """Hooks that, at each merging stage inside the language model, replace each merged token's hidden state entering
    the stage's layer by the weighted sum of its sources' states there (all read before any is replaced)."""
    adapter = get_adapter(model)
    image = adapter.image_token_mask(inputs)
    handles = []
    for stage in trace.stages:
        if stage.sources is None or stage.layer == 0:
            continue

        def hook(module, args, kwargs, stage=stage):
            hidden = args[0]
            merged = hidden.clone()
            for b, tokens in enumerate(stage.sources):
                columns = torch.nonzero(image[b]).flatten()
                for kept, (ids, weights) in zip(stage.kept[b].tolist(), tokens, strict=True):
                    state = (weights[:, None] * hidden[b, columns[ids]].float()).sum(dim=0)
                    merged[b, columns[kept]] = state.to(hidden.dtype)
            return (merged, *args[1:]), kwargs

        handles.append(adapter.layers[stage.layer].register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _with_merged(model, inputs: dict, trace: Trace, embeds: torch.Tensor, features) -> torch.Tensor:
    """`embeds` (batch, seq, hidden) with each merged token's input embedding replaced by its merged state.

    `features` are the vision features the projector got (needed for `merge_space="vision_features"`)."""
    stage = _merging_stage(trace)
    if stage is None:
        return embeds
    adapter = get_adapter(model)
    image = adapter.image_token_mask(inputs)
    embeds = embeds.clone()
    if stage.merge_space == "vision_features":
        per_sample = adapter.split_vision_features(features, [int(n) for n in image.sum(dim=1)], inputs)
    for b, tokens in enumerate(stage.sources):
        columns = torch.nonzero(image[b]).flatten()
        for kept, (ids, weights) in zip(stage.kept[b].tolist(), tokens, strict=True):
            if ids.tolist() == [kept] and weights.tolist() == [1.0]:
                continue  # a token that merges nothing keeps its own embedding
            if stage.merge_space == "hidden":
                state = (weights[:, None] * embeds[b, columns[ids]].float()).sum(dim=0)
            else:
                source = per_sample[b][ids]
                merged = (weights[:, None] * source.float()).sum(dim=0).to(source.dtype)
                state = adapter.project_vision_features(merged[None])[0]
            embeds[b, columns[kept]] = state.to(embeds.dtype)
    return embeds


def _capturing_features(adapter, captured: dict):
    """A hook putting the vision feature module's inputs in `captured["features"]`, its calls stacked on the first
    axis as the engine stacks them (a prompt's images, then its videos)."""

    def hook(module, args, kwargs):
        features = args[0] if args else next(iter(kwargs.values()))
        before = captured.get("features")
        captured["features"] = features if before is None else torch.cat([before, features.to(before.device)])

    return adapter.vision_feature_module.register_forward_pre_hook(hook, with_kwargs=True)


def _substituting(model, inputs: dict, trace: Trace) -> list:
    """Hooks that put the merged states of `trace` into the decoder stack's input embeddings (none without merging)."""
    stage = _merging_stage(trace)
    if stage is None:
        return []
    adapter = get_adapter(model)
    captured = {}
    handles = [_capturing_features(adapter, captured)] if stage.merge_space == "vision_features" else []

    def hook(module, args, kwargs):
        kwargs["inputs_embeds"] = _with_merged(model, inputs, trace, kwargs["inputs_embeds"], captured.get("features"))
        return args, kwargs

    handles.append(adapter.text_model.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _install(model, alive: list[torch.Tensor], renumber: list[bool]):
    adapter = get_adapter(model)
    eager = adapter.text_config._attn_implementation == "eager"
    handles = []
    for i, layer in enumerate(adapter.layers):
        keys = alive[i]
        if bool(keys.all()) and not renumber[i]:
            continue

        def hook(module, args, kwargs, keys=keys, renumber=renumber[i]):
            hidden = args[0]
            batch, n = hidden.shape[:2]
            k = torch.cat([keys, torch.ones(batch, n - keys.shape[1], dtype=torch.bool)], dim=1)
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            allowed = (causal[None] & k[:, None, :]) | torch.eye(n, dtype=torch.bool)[None]
            mask = allowed[:, None]
            if eager:
                mask = torch.where(mask, 0.0, torch.finfo(hidden.dtype).min).to(hidden.dtype)
            kwargs["attention_mask"] = mask
            if renumber:
                positions = (k.long().cumsum(1) - 1).clamp(min=0)
                kwargs["position_embeddings"] = adapter.position_embeddings(hidden, positions)
            return args, kwargs

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` derives them from a left-padded mask."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def _position_kwargs(model, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The position ids the references pass: none where the model derives its own (see the module docstring)."""
    if get_adapter(model).computes_positions:
        return {}
    return {"position_ids": positions_from_mask(attention_mask)}


@torch.no_grad()
def reference_logits(model, inputs: dict, trace: Trace, renumber: list[bool]) -> torch.Tensor:
    """(batch, seq, vocab) logits of the masked unpruned model, with the kept sets of `trace`."""
    alive = alive_per_layer(model, inputs, trace)
    handles = _substituting(model, inputs, trace) + _merging_in_layers(model, inputs, trace)
    handles += _install(model, alive, renumber)
    try:
        return model(**inputs, **_position_kwargs(model, inputs["attention_mask"]), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def reference_greedy(model, inputs: dict, trace: Trace, renumber: list[bool], new_tokens: int) -> torch.Tensor:
    """(batch, new_tokens) greedy continuation of the masked unpruned model, recomputed from scratch each step."""
    alive = alive_per_layer(model, inputs, trace)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    out = []
    for _ in range(new_tokens):
        handles = _substituting(model, inputs, trace) + _merging_in_layers(model, inputs, trace)
        handles += _install(model, alive, renumber)
        try:
            logits = model(
                input_ids=ids, attention_mask=mask, use_cache=False, **_position_kwargs(model, mask), **extra
            ).logits
        finally:
            for h in handles:
                h.remove()
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        # per-token inputs (Qwen's mm_token_type_ids) grow with the text: a new token is text (type 0)
        extra = {
            k: torch.cat([v, torch.zeros_like(token, dtype=v.dtype)], dim=1)
            if isinstance(v, torch.Tensor) and v.shape == ids.shape
            else v
            for k, v in extra.items()
        }
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return torch.cat(out, dim=1)


class _Captured(Exception):
    """Stops a forward once the decoder stack's input embeddings are captured."""


def _decoder_inputs(model, inputs: dict, trace: Trace | None = None) -> dict:
    """What the decoder stack receives: "embeds" (batch, seq, hidden), the text embeddings with the image features
    merged (with a `trace` of a merging stage, its merged tokens' states in place of their embeddings);
    "position_ids" ((..., batch, seq), or None); "additions" (`ModelAdapter.take_layer_additions`)."""
    captured = {}
    adapter = get_adapter(model)

    def hook(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]
        captured["position_ids"] = kwargs.get("position_ids")
        captured["additions"] = adapter.take_layer_additions(dict(kwargs))
        raise _Captured

    handles = [adapter.text_model.register_forward_pre_hook(hook, with_kwargs=True)]
    if adapter.vision_feature_module is not None:
        handles.append(_capturing_features(adapter, captured))
    try:
        model(**inputs, use_cache=False)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if trace is not None:
        captured["embeds"] = _with_merged(model, inputs, trace, captured["embeds"], captured.get("features"))
    return captured


def _kept_inputs(model, inputs: dict, trace: Trace, renumber: bool) -> list[tuple[torch.Tensor, ...]]:
    """Per sample, (kept input columns, their embeddings (1, n, hidden), their position ids (..., 1, n), and their
    per-layer additions as (mask (1, n), [(rows, hidden) per layer]) or None)."""
    if len(trace.stages) != 1 or trace.stages[0].layer != 0:
        raise ValueError("the pre-LLM reference needs a trace with one stage, at layer 0")
    captured = _decoder_inputs(model, inputs, trace)
    embeds = captured["embeds"]
    image = get_adapter(model).image_token_mask(inputs)
    image_id = torch.where(image, image.long().cumsum(1) - 1, -1)
    valid = inputs["attention_mask"].bool()
    positions = captured["position_ids"]
    if positions is None:
        positions = positions_from_mask(inputs["attention_mask"])
    positions = get_adapter(model).rope_position_ids(positions)
    additions = captured["additions"]
    samples = []
    for b, kept in enumerate(trace.stages[0].kept):
        keep_image = torch.zeros(int(image[b].sum()), dtype=torch.bool)
        keep_image[kept] = True
        columns = torch.nonzero(valid[b] & (~image[b] | keep_image[image_id[b].clamp(min=0)])).flatten()
        position_ids = torch.arange(columns.numel())[None] if renumber else positions[..., b : b + 1, columns]
        kept_additions = None
        if additions is not None:
            mask, per_layer = additions
            rows = mask.flatten().long().cumsum(0).view(mask.shape)[b, columns] - 1  # each column's addition row
            has = mask[b, columns]
            kept_additions = (has[None], [layer[rows[has]] for layer in per_layer])
        samples.append((columns, embeds[b, columns][None], position_ids, kept_additions))
    return samples


def _run_alone(model, embeds: torch.Tensor, position_ids: torch.Tensor, additions) -> torch.Tensor:
    """(1, n, vocab) logits of the unmodified model on `embeds` alone, at `position_ids`, with an explicit all-ones
    mask (without one, transformers reads a jump in the positions as the start of another packed sequence)."""
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    if additions is None:
        return model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask, use_cache=False).logits
    adapter = get_adapter(model)
    hidden = adapter.text_model(
        inputs_embeds=embeds,
        position_ids=position_ids,
        attention_mask=mask,
        use_cache=False,
        **adapter.addition_kwargs(*additions),
    ).last_hidden_state
    return model.get_output_embeddings()(hidden)


@torch.no_grad()
def pre_llm_logits(model, inputs: dict, trace: Trace, renumber: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample, (its kept input columns, ascending; their (n, vocab) logits) from the unmodified model run on the
    kept embeddings alone, at positions 0..n-1 (`renumber`) or at each kept token's original position."""
    out = []
    for columns, embeds, position_ids, additions in _kept_inputs(model, inputs, trace, renumber):
        out.append((columns, _run_alone(model, embeds, position_ids, additions)[0]))
    return out


@torch.no_grad()
def pre_llm_greedy(model, inputs: dict, trace: Trace, renumber: bool, new_tokens: int) -> list[torch.Tensor]:
    """Per sample, the (new_tokens,) greedy continuation of the unmodified model on the kept embeddings alone,
    recomputed from scratch each step; each new token takes the position after the previous one."""
    embedding = model.get_input_embeddings()
    out = []
    for _, embeds, position_ids, additions in _kept_inputs(model, inputs, trace, renumber):
        tokens = []
        for _ in range(new_tokens):
            logits = _run_alone(model, embeds, position_ids, additions)
            token = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            tokens.append(token[0])
            embeds = torch.cat([embeds, embedding(token).to(embeds.dtype)], dim=1)
            position_ids = torch.cat([position_ids, position_ids[..., -1:] + 1], dim=-1)
            if additions is not None:  # a new token has no addition
                additions = (torch.cat([additions[0], torch.zeros_like(additions[0][:, :1])], dim=1), additions[1])
        out.append(torch.cat(tokens))
    return out
