"""`vlmprune convert-prismatic` on a tiny checkpoint in Prismatic's layout, against Prismatic's forward re-done here.

The reference below is written from the official code (TRI-ML/prismatic-vlms @ 874c5bb), not from the converter:
the resize-naive transform, timm's ViT up to the second-to-last block (`get_intermediate_layers`), the GELU MLP
projector, the patches spliced in after BOS of `tokenizer("In: {question}\\nOut:")`, and the Llama it wraps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import vlmprune
from vlmprune.cli.main import main
from vlmprune.convert.prismatic import convert_prismatic
from vlmprune.cost import shape_from_config
from vlmprune.errors import ConversionError, UnsupportedModelError
from vlmprune.eval.prompts import grounding_format_for
from vlmprune.reference import reference_logits
from vlmprune.testing.prismatic import TinyPrismatic, write_tiny_prismatic

QUESTION = 'Please provide the bounding box coordinate of the region this sentence describes: "the red cat"'
HEADS = 16  # the so400m tower's heads (siglip-vit-so400m-384px), which the tiny tower keeps


def _image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(200, 300, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# ------------------------------------------------------------------------ Prismatic's forward, from its code


def _pixels(image: Image.Image, size: int) -> torch.Tensor:
    """resize-naive: Resize((size, size), bicubic) on the PIL image, ToTensor, Normalize(0.5, 0.5): (1, 3, H, W)."""
    resized = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return ((torch.from_numpy(resized).permute(2, 0, 1) - 0.5) / 0.5)[None]


def _timm_penultimate(vit: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """timm VisionTransformer.get_intermediate_layers(n={depth - 2}) for SigLIP (no [CLS], no norm_pre): (1, N, C)."""
    weight = vit["patch_embed.proj.weight"]
    x = F.conv2d(pixels, weight, vit["patch_embed.proj.bias"], stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    x = x + vit["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in vit if k.startswith("blocks."))
    for i in range(depth - 1):  # the output of block depth - 2
        p = {k[len(f"blocks.{i}.") :]: v for k, v in vit.items() if k.startswith(f"blocks.{i}.")}
        batch, n, c = x.shape
        h = F.layer_norm(x, (c,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        qkv = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(batch, n, 3, HEADS, c // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attention = ((q * (c // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, n, c)
        x = x + F.linear(mixed, p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(x, (c,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"]))  # nn.GELU(): exact erf
        x = x + F.linear(h, p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    return x


def prismatic_forward(tiny: TinyPrismatic, image: Image.Image, question: str) -> tuple[torch.Tensor, list[int]]:
    """(logits (1, 1 + N + T, V), the prompt's ids) as `PrismaticVLM.forward` computes them."""
    checkpoint = torch.load(tiny.run_dir / "checkpoints" / "latest-checkpoint.pt", weights_only=True)["model"]
    if "vision_backbone" in checkpoint:
        vit = {k.removeprefix("featurizer."): v for k, v in checkpoint["vision_backbone"].items()}
    else:
        hub = torch.load(tiny.vision_weights, weights_only=True)
        vit = {k.removeprefix("visual.trunk."): v for k, v in hub.items() if k.startswith("visual.trunk.")}
    patches = _timm_penultimate(vit, _pixels(image, 384))
    projector = checkpoint["projector"]
    projected = F.linear(
        F.gelu(F.linear(patches, projector["projector.0.weight"], projector["projector.0.bias"])),
        projector["projector.2.weight"],
        projector["projector.2.bias"],
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny.llm_dir)
    tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    ids = tokenizer(f"In: {question}\nOut:", return_tensors="pt").input_ids  # PurePromptBuilder.get_prompt()
    llm_state = {k.removeprefix("llm."): v for k, v in checkpoint["llm_backbone"].items()}
    rows = llm_state["model.embed_tokens.weight"].shape[0]
    llm = LlamaForCausalLM(LlamaConfig.from_pretrained(tiny.llm_dir, vocab_size=rows)).eval()
    llm.load_state_dict(llm_state)
    with torch.no_grad():
        embeddings = llm.get_input_embeddings()(ids)
        fused = torch.cat([embeddings[:, :1], projected, embeddings[:, 1:]], dim=1)
        return llm(inputs_embeds=fused).logits, ids[0].tolist()


# ------------------------------------------------------------------------------------------------- the converted


def _convert(root: Path, **written: bool | int) -> tuple[TinyPrismatic, Path]:
    tiny = write_tiny_prismatic(root, **written)
    vision = None if written.get("full_finetune") else tiny.vision_weights
    out = convert_prismatic(
        tiny.run_dir, root / "out", llm_dir=tiny.llm_dir, vision_weights=vision, dtype=torch.float32
    )
    return tiny, out


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    tiny, out = _convert(tmp_path_factory.mktemp("prismatic"))
    return tiny, AutoProcessor.from_pretrained(out), AutoModelForImageTextToText.from_pretrained(out).eval()


def _inputs(processor, images: list[Image.Image], questions: list[str]) -> dict:
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in questions
    ]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


@pytest.mark.parametrize(
    "written",
    [{}, {"legacy": True}, {"full_finetune": True}, {"pad_to_multiple_of": 1}],
    ids=["llama-tokenizer", "legacy", "full-finetune", "no-spare-row"],
)
def test_converted_model_equals_the_prismatic_forward(tmp_path: Path, written: dict) -> None:
    tiny, out = _convert(tmp_path, **written)
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    image = _image()
    inputs = _inputs(processor, [image], [QUESTION])
    expected, prompt_ids = prismatic_forward(tiny, image, QUESTION)

    n = 12 * 12  # 384 px, patch 32
    image_id = model.config.image_token_id
    assert inputs["input_ids"][0].tolist() == prompt_ids[:1] + [image_id] * n + prompt_ids[1:]
    torch.testing.assert_close(inputs["pixel_values"], _pixels(image, 384), atol=1e-5, rtol=0)
    with torch.no_grad():
        logits = model(**inputs).logits
    # without a spare row the vocabulary grows by one: a zero row for the `<image>` id
    spare = written.get("pad_to_multiple_of", 64) > 1
    assert logits.shape[:2] == expected.shape[:2] and logits.shape[2] == expected.shape[2] + (0 if spare else 1)
    torch.testing.assert_close(logits[..., : expected.shape[2]], expected, atol=1e-5, rtol=1e-4)


def test_feather_prunes_the_converted_model_as_the_masked_reference(converted) -> None:
    _, processor, model = converted
    inputs = _inputs(processor, [_image(), _image().rotate(90)], [QUESTION, "where is the dog"])
    method = vlmprune.build_method("feather", layers=(1, 3))
    with torch.no_grad(), vlmprune.prune(model, method) as trace:
        logits = model(**inputs).logits
    assert [stage.grid for stage in trace.stages] == [(12, 12), (12, 12)]
    assert [stage.layer for stage in trace.stages] == [1, 3]
    reference = reference_logits(model, inputs, trace, [False] * model.config.text_config.num_hidden_layers)
    rows = trace.output_index
    for b in range(rows.shape[0]):
        real = rows[b] >= 0
        torch.testing.assert_close(logits[b, real], reference[b, rows[b, real]], atol=2e-4, rtol=1e-4)


def test_the_converted_model_takes_prismatic_grounding_prompts(converted) -> None:
    _, processor, model = converted
    fmt = grounding_format_for(model.config)
    assert fmt.family == "prismatic" and fmt.frame == "stretch"
    question = fmt.prompt.format(expression="the red cat")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == f"<image> In: {question}\nOut:"
    assert fmt.parse("[0.12, 0.34, 0.56, 0.78]") == (0.12, 0.34, 0.56, 0.78)
    assert grounding_format_for("llava").family == "llava"  # a family name still works


def test_the_cost_model_reads_the_converted_config(converted) -> None:
    _, _, model = converted
    shape = shape_from_config(model.config)
    assert shape.image_tokens == 144 and shape.grid == (12, 12)
    assert shape.vision is not None and shape.vision.tokens == 144  # SigLIP: no [CLS]


def test_the_command_converts_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = write_tiny_prismatic(tmp_path)
    out = tmp_path / "out"
    argv = [str(tiny.run_dir), str(out), "--llm", str(tiny.llm_dir), "--vision", str(tiny.vision_weights)]
    assert main(["convert-prismatic", *argv, "--no-progress"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "full"
    assert config["prompt_family"] == "prismatic"
    assert AutoModelForImageTextToText.from_pretrained(out).dtype == torch.bfloat16


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err.strip()


def test_bad_runs_are_one_line_errors_naming_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = write_tiny_prismatic(tmp_path)
    base = ["--llm", str(tiny.llm_dir), "--vision", str(tiny.vision_weights)]
    config_path = tiny.run_dir / "config.json"
    config = json.loads(config_path.read_text())

    config["model"]["vision_backbone_id"] = "dinosiglip-vit-so-384px"
    config_path.write_text(json.dumps(config))
    error = _one_line_error(["convert-prismatic", str(tiny.run_dir), str(tmp_path / "a"), *base], capsys)
    assert "vision backbone 'dinosiglip-vit-so-384px'" in error and "siglip-vit-so400m-384px" in error

    config["model"]["vision_backbone_id"] = "siglip-vit-so400m-384px"
    config_path.write_text(json.dumps(config))
    (tiny.run_dir / "checkpoints" / "latest-checkpoint.pt").rename(tmp_path / "moved.pt")
    error = _one_line_error(["convert-prismatic", str(tiny.run_dir), str(tmp_path / "b"), *base], capsys)
    assert "checkpoints/latest-checkpoint.pt is missing" in error

    (tmp_path / "moved.pt").rename(tiny.run_dir / "checkpoints" / "latest-checkpoint.pt")
    argv = ["convert-prismatic", str(tiny.run_dir), str(tmp_path / "c"), "--llm", str(tiny.llm_dir)]
    error = _one_line_error(argv, capsys)
    assert "no vision_backbone" in error and "vit_so400m_patch14_siglip_384" in error

    config_path.unlink()
    error = _one_line_error(["convert-prismatic", str(tiny.run_dir), str(tmp_path / "d"), *base], capsys)
    assert "has no config.json" in error


def test_weights_of_another_layout_are_refused(tmp_path: Path) -> None:
    tiny = write_tiny_prismatic(tmp_path)
    hub = torch.load(tiny.vision_weights, weights_only=True)
    hub["visual.trunk.cls_token"] = torch.zeros(1, 1, 64)  # a CLIP-style tower
    torch.save(hub, tiny.vision_weights)
    with pytest.raises(ConversionError, match="'cls_token' has no SigLIP counterpart"):
        convert_prismatic(tiny.run_dir, tmp_path / "out", llm_dir=tiny.llm_dir, vision_weights=tiny.vision_weights)
    config = json.loads((tiny.run_dir / "config.json").read_text())
    config["model"]["llm_backbone_id"] = "vicuna-v15-7b"
    (tiny.run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"LLM backbone 'vicuna-v15-7b'.*llama2-7b-pure"):
        convert_prismatic(tiny.run_dir, tmp_path / "out", llm_dir=tiny.llm_dir, vision_weights=tiny.vision_weights)


def test_bench_builds_a_prismatic_layout_of_a_named_shape() -> None:
    from transformers import LlavaForConditionalGeneration

    from vlmprune.adapters import get_adapter
    from vlmprune.cost import get_shape
    from vlmprune.cost.shapes import ModelShape, VisionShape
    from vlmprune.testing import build_tiny_processor, llava_config_for_shape

    full = llava_config_for_shape(get_shape("prismatic-7b"))
    assert full.vision_config.model_type == "siglip_vision_model" and full.vision_config.num_hidden_layers == 27
    assert full.text_config.vocab_size == 32064 and full.vision_feature_select_strategy == "full"
    small = ModelShape(
        "prismatic-tiny", 64, 128, 2, 4, 4, 300, 36, (6, 6), vision=VisionShape(72, 128, 2, 36, ()), family="prismatic"
    )
    model = LlavaForConditionalGeneration._from_config(llava_config_for_shape(small)).eval()
    processor = build_tiny_processor(image_size=6 * 14, patch_size=14)
    inputs = processor(images=[_image()], text=["USER: <image>\nwhere is the cat ASSISTANT:"], return_tensors="pt")
    assert int(get_adapter(model).image_token_mask(inputs).sum()) == 36
    with torch.no_grad(), vlmprune.prune(model, vlmprune.build_method("fastv", layer=1)) as trace:
        model(**inputs)
    assert trace.stages[0].grid == (6, 6)
