"""The attention criterion on a hand-built decoder layer whose answer is obvious.

Every token has the same hidden state and q = k, so without RoPE every image token gets the same score;
with RoPE the score decays with the distance to the query, so the tokens nearest the last token (the bottom
rows of the image) win: the bias FEATHER reports for FastV, and which φ-R removes.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from helpers import BareAdapter
from vlmprune.criteria import Attention, SelectionContext
from vlmprune.criteria.base import kept_positions
from vlmprune.engine.layout import Layout
from vlmprune.engine.probe import AttentionProbe

SIDE, TEXT_BEFORE, TEXT_AFTER = 8, 3, 5


def _context() -> SelectionContext:
    config = LlamaConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    layer = LlamaDecoderLayer(config, layer_idx=0)
    with torch.no_grad():
        direction = torch.full((config.num_attention_heads * 32,), 0.3)
        layer.self_attn.q_proj.weight.zero_()
        layer.self_attn.k_proj.weight.zero_()
        layer.self_attn.q_proj.weight[:, 0] = direction
        layer.self_attn.k_proj.weight[:, 0] = direction[:32]
    n_image = SIDE * SIDE
    n = TEXT_BEFORE + n_image + TEXT_AFTER
    hidden = torch.zeros(1, n, 64)
    hidden[..., 0] = 1.0
    image_id = torch.full((1, n), -1)
    image_id[0, TEXT_BEFORE : TEXT_BEFORE + n_image] = torch.arange(n_image)
    positions = torch.arange(n)[None]
    layout = Layout(
        source=positions,
        valid=torch.ones(1, n, dtype=torch.bool),
        image_id=image_id,
        position_ids=positions,
        n_real=[n],
        n_image=[n_image],
    )
    cos_sin = LlamaRotaryEmbedding(config)(hidden, positions)
    probe = AttentionProbe(BareAdapter(None), layer, hidden, layout, cos_sin)
    return SelectionContext.from_lists(
        [torch.arange(n_image)], image_grids=[[(SIDE, SIDE)]], n_original=[n_image], attention_fn=probe
    )


def mean_row(kept: torch.Tensor) -> float:
    return (kept // SIDE).float().mean().item()


def test_rope_attention_prefers_the_bottom_rows_and_no_rope_does_not():
    ctx = _context()
    with_rope = kept_positions(Attention(rope=True).select(ctx, [16]))[0]
    assert mean_row(with_rope) > 5.5  # the bottom two rows hold 16 tokens: rows 6 and 7
    no_rope_scores = Attention(rope=False, softmax="image").scores(ctx)[0]
    torch.testing.assert_close(no_rope_scores, torch.full_like(no_rope_scores, 1 / SIDE**2))


def test_image_softmax_sums_to_one_over_image_keys_and_sequence_softmax_does_not():
    ctx = _context()
    image = Attention(softmax="image").scores(ctx)[0]
    sequence = Attention(softmax="sequence").scores(ctx)[0]
    torch.testing.assert_close(image.sum(), torch.tensor(1.0))
    assert 0.0 < sequence.sum().item() < 1.0
    assert (sequence < image).all()  # the text keys take their share of the probability mass


def test_text_mean_query_averages_the_text_after_the_image():
    ctx = _context()
    last = Attention(query="last", rope=False, softmax="image").scores(ctx)[0]
    mean = Attention(query="text_mean", rope=False, softmax="image").scores(ctx)[0]
    torch.testing.assert_close(mean, last)  # identical tokens: every query sees the same distribution
    raw = Attention(rope=False, softmax="none").scores(ctx)[0]
    assert torch.allclose(raw, raw[0].expand_as(raw)) and raw[0] > 1.0  # raw logits q.k/sqrt(d), not probabilities
