"""VisPruner: its selection against re-implementations written from the official code, and its visual cues
against the vision tower's own eager attention maps (CLIP with [CLS], SigLIP without)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlavaConfig, LlavaProcessor, SiglipVisionConfig

import vlmprune
from conftest import IMAGE_SIZE, PATCH, random_image
from eval_data import write_refer
from vlmprune.adapters import get_adapter
from vlmprune.cli.main import main
from vlmprune.criteria import ImportantDiverse, SelectionContext, VisionAttention
from vlmprune.criteria.base import kept_positions
from vlmprune.criteria.visual_cues import deduplicate
from vlmprune.reference import positions_from_mask, pre_llm_greedy, pre_llm_logits
from vlmprune.testing import LLAVA_CHAT_TEMPLATE, build_tiny_tokenizer, init_llava, tiny_llava_config

# --- re-implementations from the reference notes -------------------------------------------------------------


def official_encode_images(attention: torch.Tensor, features: torch.Tensor, budget: int, ratio: float):
    """`llava_arch.py::encode_images` of Theia-4869/VisPruner, transcribed: (selected indices in order, mask).

    attention (B, N) head-averaged [CLS] attention, features (B, N, C). Stable sorts stand in for `argsort`
    (the inputs here have no ties). Like the original, it needs an even residual length in every round.
    """
    batch, n, _ = features.shape
    important_num = int(budget * ratio)
    diverse_num = budget - important_num
    order = attention.argsort(dim=-1, descending=True, stable=True)
    important, residual = order[:, :important_num], order[:, important_num:]
    normalized = features / features.norm(dim=-1, keepdim=True)
    rows = torch.arange(batch).unsqueeze(-1)
    while diverse_num > 0:
        length = residual.shape[1]
        r = min(8, length - diverse_num)
        if r <= 0:
            break
        tokens = normalized[rows.expand(-1, length), residual]
        a, b = tokens[..., ::2, :], tokens[..., 1::2, :]
        scores = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct = scores.argsort(dim=-1, descending=True, stable=True)[:, r:]
        residual = torch.cat(
            [residual[..., ::2][rows.expand(-1, length // 2 - r), distinct], residual[..., 1::2]], dim=-1
        )
    selected = torch.cat([important, residual], dim=-1) if diverse_num > 0 else important
    return selected, torch.zeros(batch, n, dtype=torch.bool).scatter_(1, selected, True)


def dedup_one(residual: list[int], features: torch.Tensor, target: int, drop: int = 8) -> list[int]:
    """The de-duplication rounds on one sample's list, in plain Python; A is `residual[::2]` at any length."""
    while target > 0:
        k = min(drop, len(residual) - target)
        if k <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        unit = torch.nn.functional.normalize(features.float(), dim=-1)
        best = [max(float(unit[i] @ unit[j]) for j in b) for i in a]
        ranked = sorted(range(len(a)), key=lambda p: (-best[p], p))
        residual = [a[p] for p in ranked[k:]] + b
    return residual if target > 0 else []


def context(ids: list[torch.Tensor], attention: list[torch.Tensor], features: list[torch.Tensor], n: list[int]):
    """A selection context over present ids, with per-sample (n_b,) attention and (n_b, C) features of every
    original image token (indexed by id, as the engine captures them)."""
    return SelectionContext.from_lists(
        ids,
        image_grids=[[(1, k)] for k in n],
        n_original=n,
        vision_attention_fn=lambda: attention,
        vision_features_fn=lambda: features,
    )


def random_inputs(batch: int, n: int, channels: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    attention = torch.rand(batch, n, generator=generator).softmax(-1)
    features = torch.randn(batch, n, channels, generator=generator)
    return attention, features


# --- selection on hand-built inputs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "ratio"), [(24, 0.5), (32, 0.75), (16, 0.0), (20, 1.0), (60, 0.5), (48, 0.5), (0, 0.5)]
)
def test_selection_equals_the_official_encode_images(budget, ratio):
    attention, features = random_inputs(2, 60)
    _, expected = official_encode_images(attention, features, budget, ratio)
    ctx = context([torch.arange(60)] * 2, list(attention), list(features), [60, 60])
    keep = ImportantDiverse(important_ratio=ratio).select(ctx, [budget, budget])
    assert torch.equal(keep, expected)
    assert keep.sum(1).tolist() == [budget, budget]


def test_deduplication_reproduces_the_official_order_round_by_round():
    attention, features = random_inputs(2, 60, seed=3)
    budget, ratio = 24, 0.5  # residual 48 -> 40 -> 32 -> 24 -> 16 -> 12: four full rounds and one of 4
    selected, _ = official_encode_images(attention, features, budget, ratio)
    order = attention.argsort(dim=-1, descending=True, stable=True)
    unit = torch.nn.functional.normalize(features, dim=-1)
    residual = deduplicate(unit, order[:, 12:], [48, 48], [12, 12])
    assert torch.equal(residual, selected[:, 12:])  # the list itself, in the official order
    for b in range(2):
        assert residual[b].tolist() == dedup_one(order[b, 12:].tolist(), features[b], 12)


def test_important_tokens_are_the_top_of_the_vision_attention_and_ties_go_to_the_earlier_token():
    attention = torch.tensor([[0.1, 0.3, 0.05, 0.3, 0.25]])
    features = torch.eye(5)[None]
    ctx = context([torch.arange(5)], list(attention), list(features), [5])
    assert kept_positions(ImportantDiverse(important_ratio=1.0).select(ctx, [2]))[0].tolist() == [1, 3]
    assert kept_positions(VisionAttention().select(ctx, [3]))[0].tolist() == [1, 3, 4]


def test_diverse_tokens_drop_the_duplicates_first():
    """Residual [a, a', b, c] (a' a copy of a): one round drops the A token most similar to B."""
    attention = torch.tensor([[0.5, 0.2, 0.1, 0.15, 0.05]])  # residual order after token 0: 1, 3, 2, 4
    features = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0.01], [1, 1, 1]]])
    ctx = context([torch.arange(5)], list(attention), list(features), [5])
    # A = [1, 2], B = [3, 4]: token 1 is nearly token 3, so it goes; kept 0 (important), then 2, 3, 4
    assert kept_positions(ImportantDiverse(important_ratio=0.25).select(ctx, [4]))[0].tolist() == [0, 2, 3, 4]


@pytest.mark.parametrize(("budget", "ratio"), [(21, 0.5), (10, 0.3), (33, 0.9)])
def test_odd_residual_lengths_take_the_longer_even_half(budget, ratio):
    attention, features = random_inputs(1, 45, seed=1)
    order = attention[0].argsort(descending=True, stable=True)
    important = int(budget * ratio)
    expected = order[:important].tolist() + dedup_one(order[important:].tolist(), features[0], budget - important)
    ctx = context([torch.arange(45)], list(attention), list(features), [45])
    keep = ImportantDiverse(important_ratio=ratio).select(ctx, [budget])
    assert kept_positions(keep)[0].tolist() == sorted(expected)


def test_a_padded_batch_selects_what_each_sample_selects_alone():
    """Different present sets, counts and budgets (one with no diverse share) in one batched call."""
    attention, features = random_inputs(3, 50, seed=2)
    ids = [torch.arange(50), torch.arange(0, 50, 2), torch.tensor([3, 7, 8, 20, 21, 30, 41, 42, 49])]
    budgets, criterion = [17, 12, 1], ImportantDiverse(important_ratio=0.4)
    together = kept_positions(criterion.select(context(ids, list(attention), list(features), [50] * 3), budgets))
    for b in range(3):
        alone = criterion.select(context([ids[b]], [attention[b]], [features[b]], [50]), [budgets[b]])
        assert together[b].tolist() == kept_positions(alone)[0].tolist()
        order = ids[b][attention[b][ids[b]].argsort(descending=True, stable=True)].tolist()
        important = int(budgets[b] * 0.4)
        expected = order[:important] + dedup_one(order[important:], features[b], budgets[b] - important)
        assert ids[b][together[b]].tolist() == sorted(expected)


def test_parameters_are_checked_with_the_bad_value():
    with pytest.raises(vlmprune.ParameterError, match=r"not both: got keep=128, ratio=0\.5"):
        vlmprune.build_method("vispruner", ratio=0.5)
    with pytest.raises(vlmprune.ParameterError, match=r"got neither"):
        vlmprune.build_method("vispruner", keep=None)
    with pytest.raises(vlmprune.ParameterError, match=r"important_ratio must be in \[0, 1\], got 1\.5"):
        vlmprune.build_method("vispruner", important_ratio=1.5)
    with pytest.raises(vlmprune.ParameterError, match=r"keep .* must be >= 0, got -2"):
        vlmprune.build_method("vispruner", keep=-2)
    method = vlmprune.build_method("vispruner", keep="none", ratio="0.75")
    assert method.keep is None and method.stages()[0].budget.resolve(576, 576) == 144
    assert vlmprune.build_method("vispruner").stages()[0].layer == 0


# --- visual cues against the vision tower's own eager attention ---------------------------------------------


def eager_attentions(model, inputs):
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    return out.attentions  # per layer (images, heads, tokens, tokens)


def important_set(model, inputs, keep: int) -> list[list[int]]:
    method = vlmprune.build_method("vispruner", keep=keep, important_ratio=1.0)
    with torch.no_grad(), vlmprune.prune(model, method) as trace:
        model(**inputs)
    return [k.tolist() for k in trace.stages[0].kept]


@pytest.fixture(scope="module")
def clip_model():
    """Three CLIP layers, features from layer -2 (the middle one), eager attention for `output_attentions`."""
    config = tiny_llava_config(text_layers=2, vision_layers=3, image_size=IMAGE_SIZE, patch_size=PATCH)
    return init_llava(config, attn_implementation="eager").eval()


def test_important_set_is_the_top_cls_attention_of_the_feature_layer(clip_model, make_inputs):
    inputs = make_inputs(["what is this", "where is the cat"])
    attentions = eager_attentions(clip_model, inputs)
    keep = 30
    cls_row = {layer: attentions[layer][:, :, 0, 1:].mean(1) for layer in (-2, -1)}
    expected = [sorted(torch.topk(row, keep).indices.tolist()) for row in cls_row[-2]]
    assert important_set(clip_model, inputs, keep) == expected
    other = [sorted(torch.topk(row, keep).indices.tolist()) for row in cls_row[-1]]
    assert other != expected  # the test tells the feature layer from the last one

    adapter, captured = get_adapter(clip_model), {}
    layer = adapter.vision_attention_layer
    handle = layer.register_forward_pre_hook(lambda m, args: captured.update(hidden=args[0]))
    try:
        eager_attentions(clip_model, inputs)
    finally:
        handle.remove()
    torch.testing.assert_close(adapter.vision_attention(layer, captured["hidden"], {}), cls_row[-2])


def siglip_llava(seed: int = 0, attn: str = "eager"):
    """A tiny LLaVA with a SigLIP tower (no [CLS]; every token a patch, "full"), and its processor."""
    clip = tiny_llava_config(text_layers=3, image_size=IMAGE_SIZE, patch_size=PATCH)
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=clip.text_config,
        image_token_index=clip.image_token_id,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    config.pad_token_id = clip.pad_token_id
    from transformers import CLIPImageProcessorPil

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=build_tiny_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return init_llava(config, seed=seed, attn_implementation=attn).eval(), processor


def test_without_cls_the_important_set_is_the_mean_attention_received_at_the_last_layer():
    model, processor = siglip_llava()
    texts = ["USER: <image>\nwhat is this ASSISTANT:", "USER: <image>\nwhere is the red cat ASSISTANT:"]
    inputs = dict(processor(images=[random_image(0), random_image(1)], text=texts, return_tensors="pt", padding=True))
    received = eager_attentions(model, inputs)[-1].mean(dim=-2).mean(dim=1)  # official siglip_encoder.py
    expected = [sorted(torch.topk(row, 50).indices.tolist()) for row in received]
    assert important_set(model, inputs, 50) == expected

    method = vlmprune.build_method("vispruner", keep=40)
    with torch.no_grad(), vlmprune.prune(model, method) as trace:
        logits = model(**inputs, position_ids=positions_from_mask(inputs["attention_mask"])).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    for b, (columns, reference) in enumerate(pre_llm_logits(model, inputs, trace, renumber=True)):
        real = trace.output_index[b] >= 0
        assert torch.equal(trace.output_index[b, real], columns)
        torch.testing.assert_close(logits[b, real], reference, atol=2e-4, rtol=1e-4)
    assert [g.tolist() for g in generated] == [t.tolist() for t in pre_llm_greedy(model, inputs, trace, True, 4)]


def test_a_prompt_with_two_images_keeps_the_budget_over_both(models, processor):
    text = ["USER: <image>\n<image>\ncompare the two pictures ASSISTANT:"]
    inputs = dict(processor(images=[[random_image(0), random_image(1)]], text=text, return_tensors="pt"))
    with torch.no_grad(), vlmprune.prune(models["sdpa"], vlmprune.build_method("vispruner", keep=64)) as trace:
        models["sdpa"](**inputs)
    stage = trace.stages[0]
    assert stage.n_before == [288] and stage.n_kept == [64]
    assert 0 < int((stage.kept[0] < 144).sum()) < 64  # drawn from both images


def test_a_model_whose_features_span_several_vision_layers_is_refused(tiny_config):
    config = tiny_config.__class__(**tiny_config.to_dict())
    config.vision_feature_layer = [-2, -1]
    model = init_llava(config)
    with (
        pytest.raises(vlmprune.VlmpruneError, match="no vision-encoder attention layer"),
        vlmprune.prune(model, vlmprune.build_method("vispruner")),
    ):
        pass


# --- the command line ---------------------------------------------------------------------------------------


def test_generate_compare_viz_and_bench_run_vispruner(small_model_dir, tmp_path, capsys):
    random_image(0).save(tmp_path / "image.png")
    trace = tmp_path / "trace.json"
    args = ["generate", "--model", small_model_dir, "--image", str(tmp_path / "image.png"), "--prompt", "what is it"]
    assert main([*args, "--method", "vispruner", "--param", "keep=40", "--save-trace", str(trace)]) == 0
    assert "before the language model; the projector ran on every image token), kept 40/144" in capsys.readouterr().out
    assert json.loads(trace.read_text())["image_tokens_per_layer"] == [[40] * 6]

    data, out = write_refer(tmp_path / "data", n_refs=2), tmp_path / "compare"
    compare = ["compare", "--model", small_model_dir, "--methods", "vispruner", "--match-flops", "0.5"]
    where = ["--tasks", "refcoco", "--data", str(data), "--out", str(out), "--batch-size", "2"]
    assert main([*compare, *where, "--max-new-tokens", "4"]) == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["unpruned", "vispruner"] and abs(rows[1]["flops_reduction"] - 0.5) < 0.02
    pytest.importorskip("matplotlib")
    assert main(["viz", "--run", str(out / "vispruner"), "--out", str(tmp_path / "viz"), "--samples", "1"]) == 0
    summary = json.loads((tmp_path / "viz" / "summary.json").read_text())
    assert summary["stages"][0]["layer"] == 0

    bench = ["bench", "--shape", "llava-tiny", "--methods", "vispruner", "--batch", "2", "--repeats", "1"]
    assert main([*bench, "--warmup", "0", "--new-tokens", "2", "--out", str(tmp_path / "bench")]) == 0
    measured = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert any(r["label"] == "vispruner" for r in measured["results"])
