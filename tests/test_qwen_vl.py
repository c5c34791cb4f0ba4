"""Every method on tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models, against the independent references.

The generic oracles come from `family_oracles` (the `family` fixture runs them on each Qwen family, with the cases
in `EXTRA_CASES` added); this file keeps what is Qwen's own. Batches hold images of different sizes (dynamic grids)
and a prompt with two images; positions are the models' own 3-D M-RoPE positions; Qwen3-VL adds DeepStack features
to its first two layers.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import pytest
import torch

import vlmprune
from conftest import random_image
from family_oracles import *  # noqa: F403 (the oracle tests every family runs)
from family_oracles import CASES, Case, Family
from helpers import renumber_flags
from vlmprune.engine.compat import find_cache
from vlmprune.errors import VlmpruneError
from vlmprune.reference import reference_greedy, reference_logits
from vlmprune.testing.qwen_vl import QWEN_FAMILIES, build_tiny_qwen_processor, build_tiny_qwen_vl

# Rows beyond the generic ones: positions, DeepStack's layers, a token count that fits 4 to 16 tokens per image.
EXTRA_CASES = {
    "fastv-renumbered": Case("fastv", {"layer": 3, "ratio": 0.75, "positions": "renumbered"}),
    "fastv-inside-deepstack": Case("fastv", {"layer": 1, "ratio": 0.5}),  # between Qwen3-VL's two DeepStack layers
    "random-before-the-llm": Case("random", {"layer": 0}),
    "vispruner-renumbered": Case("vispruner", {"keep": 7, "positions": "renumbered"}),
    "knn-token-count": Case("knn", {"layer": 2, "keep": 8}),
}
QWEN_CASES = CASES | EXTRA_CASES

# transformers renamed the cache argument (5.2x: `cache`; `past_key_values` is still read, but not everywhere)
CACHE_ARGUMENT = (
    "cache" if "cache" in inspect.signature(build_tiny_qwen_vl("qwen2-vl").forward).parameters else "past_key_values"
)
PROMPTS = ["what is the color of the large object on the left", "where is the cat"]
# sample 0: one 112x84 image; sample 1: two images of different sizes
IMAGE_SIZES = [[(84, 112)], [(56, 56), (112, 84)]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models' matmuls are far faster on one thread than spread over busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def tiny_model(name: str, backend: str):
    return build_tiny_qwen_vl(name, attn_implementation=backend)


@functools.cache
def tiny_processor(name: str):
    return build_tiny_qwen_processor(name)


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def qwen(request) -> str:
    """The Qwen family every test of this module runs on."""
    return request.param


@pytest.fixture(scope="module")
def family(qwen) -> Family:
    models = {backend: tiny_model(qwen, backend) for backend in ("eager", "sdpa")}
    return Family(models=models, make_inputs=functools.partial(make_inputs, qwen), size=len(PROMPTS), new_tokens=6)


def make_inputs(name: str, samples: list[int]) -> dict:
    processor = tiny_processor(name)
    texts, images = [], []
    for b in samples:
        content = [{"type": "image"}] * len(IMAGE_SIZES[b]) + [{"type": "text", "text": PROMPTS[b]}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        images.append([random_image(10 * b + i, size) for i, size in enumerate(IMAGE_SIZES[b])])
    return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))


def test_each_image_is_its_own_grid(qwen):
    model = tiny_model(qwen, "sdpa")
    inputs = make_inputs(qwen, [0, 1])
    merge = 2
    per_image = [(h // merge, w // merge) for _, h, w in inputs["image_grid_thw"].tolist()]
    with torch.no_grad(), vlmprune.prune(model, vlmprune.build_method("uniform", layer=2)) as trace:
        model(**inputs)
    stage = trace.stages[0]
    assert stage.image_grids == [per_image[:1], per_image[1:]]
    assert stage.n_before == [sum(h * w for h, w in grids) for grids in stage.image_grids]


def test_decoding_without_a_mask_continues_at_the_models_positions(qwen):
    """A manual decode loop with no attention mask: the model derives positions from the cache's length, which
    pruning before the LLM shortened; the adapter gives the original positions instead."""
    model = tiny_model(qwen, "sdpa")
    inputs = make_inputs(qwen, [0])
    method = vlmprune.build_method("random", layer=0)
    with torch.no_grad(), vlmprune.prune(model, method):
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        out = model(**inputs, use_cache=True)
        cache, tokens = find_cache(out), [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(3):
            out = model(input_ids=tokens[-1], use_cache=True, **{CACHE_ARGUMENT: cache})
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    assert torch.equal(torch.cat(tokens, dim=1)[0], expected)


def video_inputs(name: str) -> dict:
    """One prompt with an image and a two-frame video (one temporal patch of 8x8 patches: 16 video tokens), built
    by hand: the tiny processor has no video processor. The word "picture" marks where the video goes."""
    processor = tiny_processor(name)
    vision = tiny_model(name, "sdpa").config.vision_config
    content = [{"type": "image"}, {"type": "text", "text": "picture where is the cat"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = dict(processor(text=[text], images=[[random_image(3, (84, 112))]], return_tensors="pt"))
    ids = processor.tokenizer.convert_tokens_to_ids(["picture", "<|vision_start|>", "<|video_pad|>", "<|vision_end|>"])
    at = int((inputs["input_ids"][0] == ids[0]).nonzero()[0, 0])
    video = torch.tensor([[ids[1], *[ids[2]] * 16, ids[3]]])
    types = torch.tensor([[0, *[2] * 16, 0]])
    for key, middle in (("input_ids", video), ("attention_mask", torch.ones_like(video)), ("mm_token_type_ids", types)):
        inputs[key] = torch.cat([inputs[key][:, :at], middle.to(inputs[key].dtype), inputs[key][:, at + 1 :]], dim=1)
    generator = torch.Generator().manual_seed(0)
    width = 3 * vision.temporal_patch_size * vision.patch_size**2
    inputs["pixel_values_videos"] = torch.randn(64, width, generator=generator)
    inputs["video_grid_thw"] = torch.tensor([[1, 8, 8]])
    return inputs


@pytest.mark.parametrize("case", ["fastv", "vispruner", "fastv-inside-deepstack"])
def test_video_runs_unpruned_with_a_notice_and_images_are_pruned_right(qwen, case):
    model, method = tiny_model(qwen, "sdpa"), QWEN_CASES[case].build()
    inputs = video_inputs(qwen)
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad(), vlmprune.prune(model, method) as trace:
        with pytest.warns(UserWarning, match="video tokens are not pruned"):
            logits = model(**inputs).logits
        with pytest.warns(UserWarning, match="video tokens are not pruned"):
            generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    generated = generated[:, inputs["input_ids"].shape[1] :]
    assert trace.stages[0].n_before == [n_image]
    renumber = renumber_flags(method, model.config.text_config.num_hidden_layers)
    reference = reference_logits(model, inputs, trace, renumber)
    rows = trace.output_index
    torch.testing.assert_close(logits[0, rows[0] >= 0], reference[0, rows[0][rows[0] >= 0]], atol=2e-4, rtol=1e-4)
    assert torch.equal(generated, reference_greedy(model, inputs, trace, renumber, 4))


def test_deepstack_additions_matter_so_the_oracles_see_them():
    """Control for the DeepStack oracles: without the kept tokens' additions the LLM's output changes."""
    from vlmprune.reference import _kept_inputs, _run_alone

    model, method = tiny_model("qwen3-vl", "sdpa"), EXTRA_CASES["random-before-the-llm"].build()
    inputs = make_inputs("qwen3-vl", [0])
    with torch.no_grad(), vlmprune.prune(model, method) as trace:
        model(**inputs)
    with torch.no_grad():
        _, embeds, positions, additions = _kept_inputs(model, inputs, trace, renumber=False)[0]
        assert additions is not None and len(additions[1]) == 2
        with_additions = _run_alone(model, embeds, positions, additions)
        without = _run_alone(model, embeds, positions, None)
    assert not torch.allclose(with_additions, without, atol=1e-3)


@pytest.mark.parametrize("case", ["fastv", "vispruner", "random-before-the-llm", "fastv-renumbered"])
def test_host_syncs_beyond_the_unpruned_models(qwen, case):
    """A prefill reads the device twice more than the unpruned model (the counts, and the images' grids); a decode
    step no more often."""
    from vlmprune.engine.syncs import HostSyncCounter

    model = tiny_model(qwen, "sdpa")
    inputs = {k: v for k, v in make_inputs(qwen, [0, 1]).items()}
    counts = []
    for method in (None, QWEN_CASES[case].build()):
        prefill, decode = HostSyncCounter(), HostSyncCounter()
        with torch.no_grad(), vlmprune.prune(model, method) if method else contextlib.nullcontext():
            with prefill:
                out = model(**inputs, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
            # the step's own positions: from a whole mask the model would give the step one per mask column
            positions = (mask.sum(dim=1, keepdim=True) - 1 + model.model.rope_deltas).expand(3, -1, -1)
            with decode:
                model(
                    input_ids=token,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **{CACHE_ARGUMENT: find_cache(out)},
                )
        counts.append((prefill.total, decode.total))
    (prefill_unpruned, decode_unpruned), (prefill_pruned, decode_pruned) = counts
    assert prefill_pruned <= prefill_unpruned + 2, (prefill_unpruned, prefill_pruned)
    assert decode_pruned <= decode_unpruned, (decode_unpruned, decode_pruned)


def test_vision_attention_is_per_image_and_in_token_order(qwen):
    """The merged-grid attention of an image is the same in a batch as alone (the packed tower's images never see
    each other), sums to 1 over the image's tokens (mean attention received), and the window order of
    Qwen2.5-VL is undone: the merger's rows put in token order are the tower's own output."""
    from vlmprune.adapters import get_adapter

    model = tiny_model(qwen, "sdpa")
    adapter = get_adapter(model)
    captured = {}

    def keep(module, args, kwargs):
        captured["attention"] = adapter.vision_attention(module, args[0] if args else kwargs["hidden_states"], kwargs)

    def keep_merger_input(module, args):
        captured["merger_input"] = args[0]

    handles = [
        adapter.vision_attention_layer.register_forward_pre_hook(keep, with_kwargs=True),
        adapter.vision_feature_module.register_forward_pre_hook(keep_merger_input),
    ]
    per_image = []
    try:
        with torch.no_grad():
            for samples in ([0, 1], [0], [1]):
                inputs = make_inputs(qwen, samples)
                counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
                pooled = adapter._visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
                adapter.image_grids([sum(counts)], inputs)  # the adapter learns the prompt's grids
                attention = adapter.split_vision_features(captured["attention"].unsqueeze(-1), [sum(counts)], inputs)[0]
                per_image.append(list(torch.split(attention.squeeze(-1), counts)))
                merged = adapter.vision_feature_module(captured["merger_input"])
                torch.testing.assert_close(adapter._token_order(merged), pooled)
    finally:
        for handle in handles:
            handle.remove()
    together, first, second = per_image
    for image, alone in zip(together, first + second, strict=True):
        torch.testing.assert_close(image, alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(image.sum() * 4, torch.tensor(1.0), atol=1e-5, rtol=0)  # 4 patches per token


def test_visionzip_merges_in_the_input_embeddings_where_the_patch_merger_cannot_project_one_token(qwen):
    model = tiny_model(qwen, "sdpa")
    inputs = make_inputs(qwen, [0])
    with torch.no_grad(), vlmprune.prune(model, vlmprune.build_method("visionzip", keep=8)) as trace:
        model(**inputs)
    assert trace.stages[0].merge_space == "hidden"
    assert any(len(ids) > 1 for ids, _ in trace.stages[0].sources[0])  # contextual tokens merged others
    method = vlmprune.build_method("visionzip", keep=8, space="vision_features")
    with pytest.raises(VlmpruneError, match="cannot project again"), vlmprune.prune(model, method):
        pass
