"""The hooks that run a method's stages inside a model's forward pass."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmprune.adapters.base import ModelAdapter
from vlmprune.criteria.base import Criterion, SelectionContext
from vlmprune.criteria.scope import BUDGET_SCOPES, BudgetScope, select_per_image
from vlmprune.engine.compat import (
    LAYER_ARGUMENTS,
    MULTIMODAL_ARGUMENTS,
    TEXT_MODEL_ARGUMENTS,
    check_accepts,
    find_cache,
    guard_hooks_under_compile,
    static_capacity,
    transformers_version,
)
from vlmprune.engine.layout import (
    Layout,
    attention_mask_for,
    compact,
    full_attention_mask,
    gather_rows,
    valid_keys_of,
)
from vlmprune.engine.probe import AttentionProbe
from vlmprune.errors import LayerError, NoImageTokensError, VlmpruneError
from vlmprune.methods.base import Method
from vlmprune.stage import Stage
from vlmprune.tensors import on_device
from vlmprune.trace import StageRecord, StageTimer, Trace

__all__ = ["PruningSession"]


# Models with a session installed: a second `prune()` on one of them would stack hooks that disagree.
_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@dataclass
class _Prefill:
    """State of one prefill and the decode steps that reuse its cache."""

    layouts: list[Layout]  # layouts[0] is the original sequence, layouts[s + 1] the one after stage s
    image_grids: list[list[tuple[int, int]]]
    n_image: list[int]
    inputs: Mapping[str, Any]  # the multimodal forward's keyword arguments (the adapter maps features with them)
    length: int  # L, the prefill sequence length
    cache: Any
    full_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    embeddings: torch.Tensor | None = None  # (batch, L, hidden) the decoder stack's inputs_embeds, until prefill ends
    vision_features: torch.Tensor | None = None
    vision_attention: torch.Tensor | None = None  # (images, image tokens per image), `adapter.vision_attention`
    # Per-token additions to the first layers' outputs (`adapter.take_layer_additions`): per prefill column, its
    # row in the additions (batch, L), -1 for none; and per layer, the (rows, hidden) additions.
    addition_row: torch.Tensor | None = None
    additions: list[torch.Tensor] = field(default_factory=list)
    vision_keys: torch.Tensor | None = None  # (images, image tokens per image, head_dim), `adapter.vision_keys`
    probes: dict[int, AttentionProbe] = field(default_factory=dict)
    capacity: int | None = None  # a static cache's length per layer (keys beyond what it holds are unused)
    decoding: bool = False  # a decode step has run on this prefill's cache
    # Dynamic cache: the tokens fed after the prefill (a host count), their validity, whether one is padding.
    generated: int = 0
    step_mask: torch.Tensor | None = None
    step_padded: bool | None = None
    # Static cache: the same count as a device scalar, so that a compiled decode step never reads a changing host
    # value, and per layout the validity of every cache slot (batch, capacity).
    fed: torch.Tensor | None = None
    slot_valid: dict[int, torch.Tensor] = field(default_factory=dict)
    step_kwargs: dict[int, dict[str, Any]] = field(default_factory=dict)  # per layout, the current step's arguments

    @property
    def current(self) -> Layout:
        return self.layouts[-1]


class PruningSession:
    """Installs a method's stages on a model through forward pre-hooks, and removes them.

    Prefill: a pre-hook on the multimodal module reads `input_ids`; one on the decoder stack finds the image
    tokens and starts a prefill; one on each decoder layer keeps the scoring layer's input, applies a stage
    when its layer comes (gathering the kept rows of the hidden states, positions and mask), and hands the
    reduced rows' mask and position embeddings to every later layer. Decode: the layers of each stage get a
    mask over their own (pruned) cache and, with renumbered positions, shifted positions.
    """

    def __init__(
        self, model: nn.Module, method: Method, adapter: ModelAdapter, budget_scope: BudgetScope = "global"
    ) -> None:
        if budget_scope not in BUDGET_SCOPES:
            raise VlmpruneError(
                f"budget_scope must be one of {', '.join(map(repr, BUDGET_SCOPES))}, got {budget_scope!r}"
            )
        self.model = model
        self.method = method
        self.adapter = adapter
        self.budget_scope = budget_scope
        self.stages: list[Stage] = method.stages()
        self.trace = Trace(
            method={
                "name": getattr(method, "name", type(method).__name__),
                "params": method.parameters(),
                "budget_scope": budget_scope,
            }
        )
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._inputs: dict[str, Any] = {}  # the multimodal forward's keyword arguments, `input_ids` among them
        self._new_images = False  # whether the current multimodal call got images: a new prompt, not a decode step
        self._vision_features: torch.Tensor | None = None
        self._vision_attention: torch.Tensor | None = None
        self._vision_keys: torch.Tensor | None = None
        self._run: _Prefill | None = None
        self._validate()
        depth = adapter.num_layers
        self._stage_at_layer = {stage.layer: s for s, stage in enumerate(self.stages)}
        self._scored_at_layer: dict[int, list[int]] = {}
        for s, stage in enumerate(self.stages):
            if stage.needs_attention:
                self._scored_at_layer.setdefault(stage.scoring_layer, []).append(s)
        self._first_hooked_layer = min(min(self._scored_at_layer, default=depth), self.stages[0].layer)
        # layers where a prefill does more than pass the current rows' arguments on
        self._prefill_work_at = {self._first_hooked_layer, *self._scored_at_layer, *self._stage_at_layer}
        # index of the layout each layer runs on (0 = the original sequence)
        self._layout_of_layer = [sum(stage.layer <= i for stage in self.stages) for i in range(depth)]

    # Installation ------------------------------------------------------------------------------------------

    def _validate(self) -> None:
        depth = self.adapter.num_layers
        layers = [stage.layer for stage in self.stages]
        if layers != sorted(set(layers)):
            raise LayerError(f"stage layers must be strictly increasing, got {layers}")
        for stage in self.stages:
            if stage.layer >= depth:
                raise LayerError(
                    f"{type(self.method).__name__} prunes before layer {stage.layer}, but the language model "
                    f"has {depth} layers (valid: 0 to {depth - 1})"
                )
        if self._captures_features() and self.adapter.vision_feature_module is None:
            raise VlmpruneError(f"{self.adapter.family} models expose no vision features for this criterion")
        if self._needs_vision_layer() and self.adapter.vision_attention_layer is None:
            raise VlmpruneError(
                f"this {self.adapter.family} model exposes no vision-encoder attention layer for this criterion "
                "(features taken from several vision layers, or from the embeddings)"
            )
        for stage in self.stages:
            if stage.criterion.merges == "vision_features" and not self.adapter.projects_vision_features:
                raise VlmpruneError(
                    f"{type(self.method).__name__} merges vision features before the projector, which "
                    f"{self.adapter.family} models cannot project again token by token; merge in the hidden states "
                    "(space='hidden' or 'auto')"
                )

    def install(self) -> None:
        if self.model in _ACTIVE:
            raise VlmpruneError(
                "vlmprune.prune is already active on this model: one method at a time (exit the outer block first)"
            )
        try:
            adapter = self.adapter
            check_accepts(adapter.multimodal_module, MULTIMODAL_ARGUMENTS, "the multimodal model")
            check_accepts(adapter.text_model, TEXT_MODEL_ARGUMENTS, "the decoder stack")
            check_accepts(adapter.layers[0], LAYER_ARGUMENTS, "a decoder layer")
            guard_hooks_under_compile()
            self._hook(adapter.multimodal_module, self._on_multimodal)
            self._hook(adapter.text_model, self._on_text_model)
            self._handles.append(adapter.text_model.register_forward_hook(self._after_text_model))
            if self._captures_features():
                self._hook(adapter.vision_feature_module, self._on_vision_features)
            if self._needs_vision_layer():
                self._hook(adapter.vision_attention_layer, self._on_vision_attention)
            for i in range(self._first_hooked_layer, adapter.num_layers):
                self._hook(adapter.layers[i], self._layer_hook(i))
            for i in range(adapter.addition_layers):
                self._handles.append(adapter.layers[i].register_forward_hook(self._addition_hook(i)))
        except BaseException:
            self.remove()  # no hook outlives a failed install
            raise
        _ACTIVE.add(self.model)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        _ACTIVE.discard(self.model)
        self._run = None
        self._inputs = {}
        self._new_images = False
        self._vision_features = None
        self._vision_attention = None
        self._vision_keys = None

    def _needs(self, capture: str) -> bool:
        return any(capture in s.criterion.requires for s in self.stages)

    def _captures_features(self) -> bool:
        """Whether the vision features are captured: a criterion reads them, or the adapter maps the vision layer's
        attention or keys with them."""
        return self._needs("vision_features") or (self._needs_vision_layer() and self.adapter.attention_needs_features)

    def _needs_vision_layer(self) -> bool:
        return self._needs("vision_attention") or self._needs("vision_keys")

    def _hook(self, module: nn.Module, fn: Any) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    # Hooks -------------------------------------------------------------------------------------------------

    def _on_multimodal(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._inputs = {**kwargs, "input_ids": kwargs.get("input_ids", args[0] if args else None)}
        self._new_images = self.adapter.has_images(kwargs)

    def _on_vision_features(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # A prompt may be encoded in several calls (LLaVA-OneVision: its images, then its videos; newer `generate`
        # encodes before the forward): calls are stacked on the first axis (crops or frames), in call order, until
        # the prefill takes them, for the adapter to split.
        self._vision_features = _stacked(self._vision_features, args[0] if args else next(iter(kwargs.values())))

    def _on_vision_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._needs("vision_attention"):
            self._vision_attention = _stacked(
                self._vision_attention, self.adapter.vision_attention(module, hidden, kwargs)
            )
        if self._needs("vision_keys"):
            self._vision_keys = _stacked(self._vision_keys, self.adapter.vision_keys(module, hidden, kwargs))

    def _on_text_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise VlmpruneError("vlmprune expects the language model to receive inputs_embeds (a VLM forward)")
        cache = find_cache(kwargs, args)  # by type: transformers has renamed its argument before
        run = self._run
        # A decode step continues the cache this session's prefill filled; told apart without reading the cache's
        # length, which a static cache keeps on the device.
        if run is not None and cache is not None and run.cache is cache and not self._new_images:
            return args, self._start_decode_step(embeds, kwargs)
        past = int(cache.get_seq_length()) if cache is not None else 0
        if past:
            raise VlmpruneError(
                f"vlmprune got a forward on a KV cache that already holds {past} tokens its last prefill did not fill: "
                "prefill the prompt inside the same `vlmprune.prune` block and decode from the cache it returned (a "
                "new prompt with images on a filled cache is not supported). If you did, transformers "
                f"{transformers_version()} passes the cache in a way this vlmprune does not know: run `vlmprune env` "
                "and report its output"
            )
        additions = self.adapter.take_layer_additions(kwargs)  # the engine adds them to the rows it keeps
        self._start_prefill(embeds, kwargs, cache)
        if additions is None:
            return None
        self._run.addition_row = _rows_of_columns(additions[0])
        self._run.additions = additions[1]
        return args, kwargs

    def _layer_hook(self, index: int) -> Any:
        prefill_work = index in self._prefill_work_at

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            run = self._run
            if run is None:
                return None
            if run.decoding:
                return self._decode_layer(index, args, kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            if prefill_work:
                hidden = self._prefill_layer(index, module, hidden, kwargs)
            layout = run.current
            if layout.is_original:
                return None
            kwargs.update(
                attention_mask=layout.mask,
                position_embeddings=layout.position_embeddings,
                position_ids=self.adapter.layer_position_ids(layout.position_ids),
            )
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    @torch.compiler.disable  # selection and its records run eagerly between compiled stretches of layers
    def _prefill_layer(self, index: int, module: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """At a layer that scores or prunes: keeps the probes it scores for, applies its stage; returns its rows."""
        run = self._run
        layout = run.current
        if layout.is_original and run.full_position_embeddings is None:
            batch = hidden.shape[0]  # (cos, sin) are (..., batch or 1, L, head_dim); M-RoPE may lead with its 3 axes
            run.full_position_embeddings = tuple(
                t.expand(*t.shape[:-3], batch, *t.shape[-2:]) for t in kwargs["position_embeddings"]
            )
        # A stage scored by its own layer ("after") sees that layer's input before the cut; a stage scored by an
        # earlier layer sees the rows that layer really runs on, after any stage applied at it.
        scored_here = self._scored_at_layer.get(index, ())
        for s in (s for s in scored_here if self.stages[s].layer == index):
            run.probes[s] = AttentionProbe(self.adapter, module, hidden, layout, self._embeddings_of(layout))
        if index in self._stage_at_layer:
            hidden = self._apply_stage(self._stage_at_layer[index], hidden)
            layout = run.current
        for s in (s for s in scored_here if self.stages[s].layer != index):
            run.probes[s] = AttentionProbe(self.adapter, module, hidden, layout, self._embeddings_of(layout))
        return hidden

    def _embeddings_of(self, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run.full_position_embeddings if layout.is_original else layout.position_embeddings

    def _addition_hook(self, index: int) -> Any:
        """A forward hook that adds layer `index`'s per-token additions (DeepStack) to the rows the layer ran on."""

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            run = self._run
            if run is None or run.decoding or index >= len(run.additions):
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = _add_rows(hidden, run.current, run.addition_row, run.additions[index])
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _after_text_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        run = self._run
        if run is not None and not run.decoding:
            self._finish_prefill(run, output)

    @torch.compiler.disable
    def _finish_prefill(self, run: _Prefill, output: Any) -> None:
        layouts = [run.layouts[s] for s in self._layout_of_layer]  # the layout each decoder layer ran on
        self.trace.tokens_per_layer = torch.tensor([layout.n_real for layout in layouts]).T
        self.trace.image_tokens_per_layer = torch.tensor([layout.n_image for layout in layouts]).T
        self.trace.output_index = run.current.source
        run.probes.clear()
        run.vision_features = run.vision_attention = run.vision_keys = run.embeddings = None
        run.additions, run.addition_row = [], None  # added once, in the prefill
        run.inputs = {}
        if run.cache is None:  # the decoder stack made its own cache (a forward with use_cache), or none
            run.cache = find_cache(output.values() if isinstance(output, Mapping) else output)
        if run.cache is None:
            self._run = None  # no cache to decode from: every call is a prefill
        elif run.capacity is not None:
            self._prepare_static_decode(run)

    # Prefill -----------------------------------------------------------------------------------------------

    @torch.compiler.disable  # the prefill's one host read, and records: run eagerly under torch.compile
    def _start_prefill(self, embeds: torch.Tensor, kwargs: dict, cache: Any) -> None:
        self._run = None
        inputs, self._inputs = self._inputs, {}
        input_ids = inputs.get("input_ids")
        batch, length = embeds.shape[:2]
        if input_ids is None or tuple(input_ids.shape) != (batch, length):
            raise VlmpruneError("vlmprune needs the prompt's input_ids (not only inputs_embeds) to find image tokens")
        image_mask = self.adapter.image_token_mask(inputs)
        valid = valid_keys_of(kwargs.get("attention_mask"), batch, length, embeds.device)
        # The prefill's one wait for the device: every later count is derived from these on the host.
        n_image, n_real = torch.stack([image_mask.sum(dim=1), valid.sum(dim=1)]).tolist()
        if min(n_image) == 0:
            missing = [b for b, n in enumerate(n_image) if n == 0]
            raise NoImageTokensError(
                f"sample(s) {missing} of the batch have no image tokens; vlmprune prunes image tokens, so every "
                "prompt needs an image (check that the processor inserted the image placeholder)"
            )
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = self.adapter.default_position_ids(batch, length, 0, embeds.device)
        image_id = torch.where(image_mask, image_mask.long().cumsum(dim=1) - 1, -1)
        original = Layout(
            source=torch.arange(length, device=embeds.device).expand(batch, -1),
            valid=valid,
            image_id=image_id,
            position_ids=position_ids.expand(*position_ids.shape[:-2], batch, length),
            n_real=n_real,
            n_image=n_image,
        )
        image_grids = self.adapter.image_grids(n_image, {**inputs, "decoder_position_ids": position_ids})
        self.method.check_model(self.adapter.num_layers, image_grids)
        self.trace.reset()
        self.trace.calls += 1
        self.trace.image_tokens = n_image
        self._run = _Prefill(
            layouts=[original],
            image_grids=image_grids,
            n_image=n_image,
            inputs=inputs,
            length=length,
            cache=cache,
            vision_features=self._vision_features,
            capacity=static_capacity(cache),
            vision_attention=self._vision_attention,
            vision_keys=self._vision_keys,
            embeddings=embeds,
        )
        self._vision_features = self._vision_attention = self._vision_keys = None

    def _apply_stage(self, s: int, hidden: torch.Tensor) -> torch.Tensor:
        """Runs stage `s` on the current rows; returns the kept rows of `hidden` and appends the new layout.

        One batched selection over (batch, m) image slots; the kept counts are host integers (read from the
        device once, only for a criterion whose count depends on the data).
        """
        run, stage = self._run, self.stages[s]
        layout = run.current
        timer = StageTimer(hidden.device)
        image_cols, present = layout.image_slots()  # (batch, m)
        image_ids = torch.gather(layout.image_id, 1, image_cols).masked_fill(~present, -1)
        budgets = [stage.budget.resolve(n, c) for n, c in zip(run.n_image, layout.n_image, strict=True)]
        probe = run.probes.pop(s, None)
        ctx = SelectionContext(
            image_ids=image_ids,
            counts=list(layout.n_image),
            image_grids=run.image_grids,
            n_original=run.n_image,
            stage_index=s,
            attention_fn=probe,
            vision_features_fn=self._vision_features_of(run) if run.vision_features is not None else None,
            hidden_states_fn=lambda: gather_rows(hidden, image_cols),
            vision_attention_fn=self._vision_attention_of(run) if run.vision_attention is not None else None,
            instruction_fn=lambda: (hidden, layout.instruction_rows()),
            keys_fn=probe.keys if probe is not None else None,
            final_norm_fn=self.adapter.final_norm,
            vision_keys_fn=self._vision_keys_of(run) if run.vision_keys is not None else None,
            rows_attention_fn=probe.rows_attention if probe is not None else None,
            input_embeddings_fn=lambda: self._input_embeddings_of(run, layout),
        )
        space = self._merge_space(stage.criterion)
        weights = None
        if self.budget_scope == "per_image":
            keep, n_kept, weights = select_per_image(stage.criterion, ctx, budgets, merges=space is not None)
            keep &= present
        else:
            keep = stage.criterion.select(ctx, budgets) & present
            n_kept = stage.criterion.counts(ctx, budgets)
        if n_kept is None:
            n_kept = keep.sum(dim=1).tolist()
        new, index = self._reduced_layout(layout, image_cols, keep, n_kept, stage, hidden)
        run.layouts.append(new)
        kept_slots, kept_valid = compact(keep, n_kept)
        kept_ids = torch.gather(image_ids, 1, kept_slots).masked_fill(~kept_valid, -1)
        merge_weights = None
        if space is not None:
            if weights is None:
                weights = stage.criterion.merge_weights(ctx, budgets, keep)  # (batch, m, m), rows of the kept slots
            hidden = self._merged(hidden, image_cols, keep, weights, space, ctx)
            merge_weights = torch.gather(weights, 1, kept_slots[:, :, None].expand(-1, -1, weights.shape[2]))
            merge_weights = merge_weights.masked_fill(~kept_valid[:, :, None], 0.0)
        kept_hidden = gather_rows(hidden, index)
        timer.stop()
        self.trace.stages.append(
            StageRecord(
                layer=stage.layer,
                grid=run.image_grids[0][0],
                kept_ids=kept_ids,
                n_kept=n_kept,
                image_grids=run.image_grids,
                n_before=list(layout.n_image),
                scoring_layer=stage.scoring_layer if stage.needs_attention else None,
                timer=timer,
                merge_space=space,
                merge_weights=merge_weights,
                merge_ids=image_ids if merge_weights is not None else None,
            )
        )
        return kept_hidden

    def _merge_space(self, criterion: Criterion) -> str | None:
        """Where `criterion` merges on this model ("auto" resolved), or None if it keeps a subset."""
        if criterion.merges == "auto":
            return "vision_features" if self.adapter.projects_vision_features else "hidden"
        return criterion.merges

    def _merged(
        self,
        hidden: torch.Tensor,
        image_cols: torch.Tensor,
        keep: torch.Tensor,
        weights: torch.Tensor,
        space: str,
        ctx: SelectionContext,
    ) -> torch.Tensor:
        """`hidden` with each kept image row that merges others replaced by its merged state: `weights` (batch, m, m)
        times the slots' hidden states, or (`space="vision_features"`) the projection of `weights` times their vision
        features."""
        rows = gather_rows(hidden, image_cols)  # (batch, m, hidden)
        if space == "hidden":
            merged = (weights @ rows.float()).to(hidden.dtype)
        else:
            features = ctx.vision_features()
            merged = self.adapter.project_vision_features((weights @ features.float()).to(features.dtype))
        # a kept token that merges nothing keeps its own row (a projection of resampled features may differ from it)
        identity = torch.diag_embed(torch.ones_like(weights[..., 0]))
        merging = keep & (weights != identity).any(dim=-1)
        rows = torch.where(merging[:, :, None], merged.to(hidden.dtype), rows)
        batch, n, width = hidden.shape
        spare = image_cols.masked_fill(~ctx.present, n)  # padding slots write to a spare row, then dropped
        widened = torch.cat([hidden, hidden.new_zeros(batch, 1, width)], dim=1)
        return widened.scatter(1, spare[:, :, None].expand(-1, -1, width), rows)[:, :n]

    def _reduced_layout(
        self,
        layout: Layout,
        image_cols: torch.Tensor,
        keep: torch.Tensor,
        n_kept: list[int],
        stage: Stage,
        hidden: torch.Tensor,
    ) -> tuple[Layout, torch.Tensor]:
        """The layout of `layout`'s text rows and kept image rows, left-padded, and its (batch, width) row index.

        `image_cols` and `keep` (batch, m) are the image slots' rows and which are kept, `n_kept` their counts.
        """
        run, device = self._run, layout.valid.device
        batch, n = layout.valid.shape
        # Image rows to keep, scattered back onto the rows; padding slots go to a spare column that is dropped.
        spare = image_cols.masked_fill(~keep, n)
        kept_rows = torch.zeros(batch, n + 1, dtype=torch.bool, device=device).scatter(1, spare, True)[:, :n]
        kept_rows |= layout.valid & (layout.image_id < 0)  # every text row stays
        n_real = [real - image + kept for real, image, kept in zip(layout.n_real, layout.n_image, n_kept, strict=True)]
        width = max(n_real)
        # Row r of sample b goes to column (its rank among the kept rows) + (the sample's left padding).
        pad = width - on_device(n_real, device)[:, None]
        destination = torch.where(kept_rows, kept_rows.long().cumsum(dim=1) - 1 + pad, width)
        rows = torch.arange(n, device=device).expand(batch, n)
        index = torch.zeros(batch, width + 1, dtype=torch.long, device=device).scatter(1, destination, rows)
        index = index[:, :width]
        valid = torch.arange(width, device=device)[None, :] >= pad
        source = torch.where(valid, torch.gather(layout.source, 1, index), -1)
        image_id = torch.where(valid, torch.gather(layout.image_id, 1, index), -1)
        original = run.layouts[0]
        from_source = source.clamp(min=0)
        if stage.positions == "original":
            position_ids = gather_rows(original.position_ids, from_source, dim=original.position_ids.dim() - 1)
            position_embeddings = tuple(
                gather_rows(t, from_source, dim=t.dim() - 2) for t in run.full_position_embeddings
            )
            shift = None
        else:
            position_ids = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
            position_embeddings = self.adapter.position_embeddings(hidden, position_ids)
            # a decode step's original positions continue after the prompt's last one; renumbered, after its rank
            shift = self._next_position(original) - on_device(n_real, device)
        reduced = Layout(
            source=source,
            valid=valid,
            image_id=image_id,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            n_real=n_real,
            n_image=list(n_kept),
            decode_shift=shift,
        )
        valid_keys = valid if run.capacity is None else F.pad(valid, (0, run.capacity - width), value=False)
        reduced.mask = attention_mask_for(
            self.adapter.text_config, valid_keys, width, hidden.dtype, padded=reduced.padded, query_start=0
        )
        return reduced, index

    def _next_position(self, layout: Layout) -> torch.Tensor:
        """(batch,) the position after the largest of `layout`'s real rows, on any of the axes RoPE reads."""
        rows = self.adapter.rope_position_ids(layout.position_ids)
        last = rows.masked_fill(~layout.valid, -1).amax(dim=-1)
        return last.reshape(-1, layout.valid.shape[0]).amax(dim=0) + 1

    def _input_embeddings_of(self, run: _Prefill, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """(every original image token's input embedding (batch, N, hidden), the current rows' (batch, n, hidden))."""
        image_cols, _ = run.layouts[0].image_slots()
        return gather_rows(run.embeddings, image_cols), gather_rows(run.embeddings, layout.source.clamp(min=0))

    def _vision_features_of(self, run: _Prefill) -> Any:
        def features() -> list[torch.Tensor]:
            return self.adapter.split_vision_features(run.vision_features, run.n_image, run.inputs)

        return features

    def _vision_keys_of(self, run: _Prefill) -> Any:
        def keys() -> list[torch.Tensor]:  # per sample, (N_b, head_dim) in image-token order
            return self.adapter.split_vision_features(run.vision_keys, run.n_image, run.inputs, run.vision_features)

        return keys

    def _vision_attention_of(self, run: _Prefill) -> Any:
        def attention() -> list[torch.Tensor]:  # per sample, (N_b,) in image-token order
            per_token = run.vision_attention.unsqueeze(-1)  # split as the features are: one channel
            split = self.adapter.split_vision_features(per_token, run.n_image, run.inputs, run.vision_features)
            return [a.squeeze(-1) for a in split]

        return attention

    # Decode ------------------------------------------------------------------------------------------------

    def _prepare_static_decode(self, run: _Prefill) -> None:
        """Device state that a static cache's decode steps update in place (so a compiled step can capture it)."""
        device = run.layouts[0].valid.device
        run.fed = torch.zeros((), dtype=torch.long, device=device)
        run.slot_valid = {
            s: F.pad(layout.valid, (0, run.capacity - layout.width), value=True)
            for s, layout in enumerate(run.layouts)
            if s > 0
        }
        for state in (run.fed, *run.slot_valid.values()):
            torch._dynamo.mark_static_address(state)  # as transformers does for its static cache: CUDA graphs keep it

    def _start_decode_step(self, embeds: torch.Tensor, kwargs: dict) -> dict:
        """Prepares a decode step of `q` tokens: each pruned layout's mask over its own cache, and positions.

        With a static cache nothing here reads a host value that changes from step to step, so that transformers'
        compiled decoding (`generate` with a static cache) traces this once.
        """
        run = self._run
        run.decoding = True
        batch, q = embeds.shape[:2]
        config, dtype = self.adapter.text_config, embeds.dtype
        attention_mask = full_attention_mask(kwargs.get("attention_mask"))
        if attention_mask is not None and attention_mask.dim() != 2:
            attention_mask = None  # transformers' 4-D mask (generate with a static cache): new tokens are never padding
        if run.capacity is None:
            past = run.generated
            run.generated += q
            if attention_mask is not None:
                run.step_mask = attention_mask[:, -run.generated :].bool()
                run.step_padded = None  # the caller's mask may hold zeros: unknown without asking the device
            else:
                run.step_mask = torch.ones(batch, run.generated, dtype=torch.bool, device=embeds.device)
                run.step_padded = False
        else:
            past = run.fed
            new_slots = torch.arange(q, device=embeds.device) + run.fed
            if attention_mask is not None:
                for s, slots in run.slot_valid.items():
                    columns = (new_slots + run.layouts[s].width).expand(batch, q)
                    slots.scatter_(1, columns, attention_mask[:, -q:].bool())
        position_ids = self.adapter.decode_position_ids(
            kwargs.get("position_ids"), self._inputs, batch, q, run.length + past, embeds.device
        )
        kwargs["position_ids"] = position_ids
        run.step_kwargs = {}
        for s in range(1, len(run.layouts)):
            layout = run.layouts[s]
            if run.capacity is None:
                valid_keys = torch.cat([layout.valid, run.step_mask], dim=1)
                mask = attention_mask_for(config, valid_keys, q, dtype, padded=layout.padded or run.step_padded)
            else:
                start = run.fed + layout.width
                mask = attention_mask_for(config, run.slot_valid[s], q, dtype, padded=True, query_start=start)
            step = {"attention_mask": mask}
            if layout.decode_shift is not None:
                shifted = position_ids - layout.decode_shift.view(-1, 1)  # (..., batch, q): M-RoPE's axes lead
                step["position_ids"] = self.adapter.layer_position_ids(shifted)
                step["position_embeddings"] = self.adapter.position_embeddings(embeds, shifted)
            run.step_kwargs[s] = step
        if run.fed is not None:
            run.fed.add_(q)
        if self.stages[0].layer == 0:
            # Every layer runs on a pruned layout with a mask of its own: the model's mask over the original
            # sequence would be sized against the pruned cache, so let it build none from the caller's.
            kwargs["attention_mask"] = None
        return kwargs

    def _decode_layer(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        s = self._layout_of_layer[index]
        if s == 0:
            return None
        kwargs.update(self._run.step_kwargs[s])
        return args, kwargs


def _rows_of_columns(mask: torch.Tensor) -> torch.Tensor:
    """(batch, L) each True column's rank among the True entries of `mask` in row-major order, -1 elsewhere."""
    rank = mask.flatten().long().cumsum(dim=0).view(mask.shape) - 1
    return torch.where(mask, rank, -1)


def _add_rows(
    hidden: torch.Tensor, layout: Layout, row_of_column: torch.Tensor, additions: torch.Tensor
) -> torch.Tensor:
    """`hidden` (batch, width, dim) on `layout`'s rows, each row plus its source column's row of `additions` (if any).

    A row carries its own token's addition; rows without one are returned untouched (not even + 0).
    """
    row = torch.gather(row_of_column.to(hidden.device), 1, layout.source.clamp(min=0))
    has = (row >= 0) & (layout.source >= 0)
    added = hidden + additions.to(hidden.device, hidden.dtype)[row.clamp(min=0)]
    return torch.where(has[..., None], added, hidden)


def _stacked(before: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if before is None else torch.cat([before, new.to(before.device)], dim=0)
