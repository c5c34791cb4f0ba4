"""Independent re-implementations of the official selection rules, written from the official code, for the tests.

Each function follows one official file step by step, on one sample (batch 1, no padding, as the official
codes run), with plain tensor code and none of vlmprune's helpers:

- `attention_scores`: FastV (`LlamaModel.forward` of the original fork and `fastv_forward` of the llava-hf fork,
  reading eager attention), PyramidDrop (`pdrop_rank_drop`) and FEATHER (`calculate_attention_weight`): q·kᵀ in
  the model's dtype divided by √d, softmax in float32 cast back to the model's dtype, `mean` over heads (and over
  query tokens) in the model's dtype. `dtype=torch.float32` is the same rule computed in float32.
- `received_from_all`: FastV's paper, the average attention a token receives from all other tokens.
- `budget_*`: each code's kept count, its own Python expression.
- `dpc_knn_keep`: FEATHER's `FastVPatchCluster.forward` + `patch_cluster.py::cluster_dpc_knn`.
- `top`: `topk` then `.sort()`; ties go to the earlier token (the official `topk` leaves them to the backend).
"""

from __future__ import annotations

import math

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


def budget_fastv(n: int, ratio: float) -> int:
    """llava-hf fork: `round(FASTV_image_token_length * (1 - FASTV_r))`."""
    return round(n * (1 - ratio))


def budget_pdrop(n: int, ratio_list: list[float], stage: int) -> int:
    """`keep_length = int(cur_image_token * self.image_token_ratio_list[cur_num + 1])`, the list with 1.0 first."""
    ratios = [1.0, *ratio_list]
    return int(n * ratios[stage + 1])


def budget_feather(n_current: int, ratio: float, stage: int) -> int:
    """`fastV_ratio = 1 - fastv_ratio`; stage 1 `int(len * fastV_ratio)`, stage 2 `int(len * (r * r))`."""
    keep = 1 - ratio
    return int(n_current * keep) if stage == 0 else int(n_current * (keep * keep))


def budget_feather_generic(n: int, ratio: float) -> int:
    """FEATHER's generic mode (and vlmprune's one-stage ratio budgets): `int(len(image_indices) * fastV_ratio)`."""
    return int(n * (1 - ratio))


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ascending; on equal scores the earlier index wins."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k].sort().values


def qk(layer, hidden: torch.Tensor, cos_sin, rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, heads, n, d) queries and keys of `layer` for hidden (1, n, hidden), as `calculate_attention_weight`."""
    attn = layer.self_attn
    config = attn.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = attn.head_dim
    bsz, n, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    q = attn.q_proj(normed).view(bsz, n, heads, head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(bsz, n, kv_heads, head_dim).transpose(1, 2)
    if rope:
        cos, sin = cos_sin
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, repeat_kv(k, heads // kv_heads)


def attention_scores(
    layer,
    hidden: torch.Tensor,
    cos_sin,
    image: slice,
    *,
    softmax: str,
    rope: bool,
    queries: list[int] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(n_image,) attention each image token receives from the query rows (default: the last row).

    softmax "sequence": FastV / PyramidDrop, over every key the query sees (causal mask added); "image": FEATHER,
    over the image keys only. `dtype` None is the model's own dtype (the official rounding).
    """
    q, k = qk(layer, hidden, cos_sin, rope)
    dtype = dtype or q.dtype
    q, k = q.to(dtype), k.to(dtype)
    n = hidden.shape[1]
    rows = queries if queries is not None else [n - 1]
    text_q = q[:, :, rows, :]
    head_dim = q.shape[-1]
    if softmax == "image":
        weights = torch.matmul(text_q, k[:, :, image, :].transpose(2, 3)) / math.sqrt(head_dim)
        weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(dtype)
        per_query = weights.mean(dim=1)[0]  # (queries, n_image)
    else:
        weights = torch.matmul(text_q, k.transpose(2, 3)) / math.sqrt(head_dim)
        causal = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[rows]
        weights = weights + causal
        weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(dtype)
        per_query = torch.mean(weights, dim=1)[0][:, image]  # mean over heads, then the image columns
    return torch.mean(per_query, dim=0)  # over query tokens (PyramidDrop's `attention_avg_text`)


def received_from_all(layer, hidden: torch.Tensor, cos_sin, image: slice, *, rope: bool) -> torch.Tensor:
    """(n_image,) FastV's paper: the head-averaged attention map's column sums without the diagonal, over n − 1."""
    q, k = qk(layer, hidden, cos_sin, rope)
    q, k = q.float(), k.float()
    n = hidden.shape[1]
    weights = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    weights = weights + torch.full((n, n), float("-inf")).triu(1)
    attention = weights.softmax(dim=-1).mean(dim=1)[0]  # (n, n): row i is what token i attends to
    received = attention.sum(dim=0) - attention.diagonal()
    return (received / (n - 1))[image]


def dpc_knn_keep(features: torch.Tensor, cluster_num: int, k: int = 5) -> torch.Tensor:
    """FEATHER's φKNN on (n, C) features: the ascending indices of the `cluster_num` DPC-KNN centres.

    `FastVPatchCluster.forward`: `k = min(3, max(cluster_num // 2, 1)) if self.k > cluster_num else self.k`; then
    `cluster_dpc_knn` without `token_mask`. Its uniform 1e-6 noise on the densities only breaks ties, at random;
    here the earlier token counts as denser on equal densities, as vlmprune decides them (ties are common: with
    k = 1, for budgets below 4, every density is exp(0) = 1; with k = 2 mutual nearest neighbours tie).
    """
    k = min(3, max(cluster_num // 2, 1)) if k > cluster_num else k
    x = features[None].float()
    _, _, channels = x.shape
    dist_matrix = torch.cdist(x, x) / (channels**0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=k, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    index = torch.arange(x.shape[1])
    tie = (density[:, None, :] == density[:, :, None]) & (index[None, :] < index[:, None])
    mask = ((density[:, None, :] > density[:, :, None]) | tie).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    return index_down[0].sort().values
