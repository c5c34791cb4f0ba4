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
- `fastervlm_keep`: FasterVLM's `encode_images` (Theia-4869/FasterVLM).
- `divprune_picks`: DivPrune's `DivPrune` + `pairwise_cosine_similarity` (vbdi/divprune `llava_arch.py`).
- `dart_keep`: DART's `get_retained_image_token` (its LLaVA `modeling_llama.py`).
- `cdpruner_keep`: CDPruner's `encode_images` (Theia-4869/CDPruner `llava_arch.py`).
- `sparsevlm_raters`, `sparsevlm_cut`, `sparsevlm_clusters`: SparseVLM (Gumpest/SparseVLMs `26a5f48`,
  `modelling_sparse_llama.py::LlamaDynamicvitModel.forward`, `score.py::attn_postprocess_topk`,
  `utils.py::cluster_and_merge`; `attn_postprocess_rank` of `91fb6d9` for the adaptive count).
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


def fastervlm_keep(cls_attention: torch.Tensor, visual_token_num: int) -> torch.Tensor:
    """`encode_images`: `image_attentions.mean(dim=1)` over heads of the (heads, N) [CLS] row, `topk(T)`; sorted."""
    return top(cls_attention.mean(dim=0), visual_token_num)


def divprune_picks(visual_feature_vectors: torch.Tensor, threshold_ratio: float) -> torch.Tensor:
    """`DivPrune(features, image_feature_length, None, threshold_ratio)` on (N, D) features: the picks, in order."""
    image_feature_length = visual_feature_vectors.shape[0]
    threshold_terms = int(round(threshold_ratio * image_feature_length))  # noqa: RUF046 (the code's expression)
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        if i == 0:
            m2 = cosine_matrix
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i)))
        if i == 0:  # noqa: SIM108 (as the code reads)
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]  # for distance
        else:
            scores = torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s


def dart_keep(
    last_layer_state: torch.Tensor,
    k_states: torch.Tensor,
    image_start: int,
    image_length: int,
    max_num_trunction: int,
    pivot_image_token: int = 4,
    pivot_text_token: int = 4,
    pivot_order: list[int] | None = None,
) -> torch.Tensor:
    """`get_retained_image_token` on one sample: ascending kept indices into the image tokens.

    `last_layer_state` (n, hidden) is the final-normed input of the pruned layer, `k_states` (heads, n, head_dim)
    the keys of the layer before. The code visits the pivots in the order of a Python `set` of row indices;
    `pivot_order` (row indices) replaces that order when given.
    """
    token_topk = int(max_num_trunction // (pivot_image_token + pivot_text_token))
    k_states = k_states.permute(1, 0, 2).reshape(k_states.shape[1], -1)
    k_image = k_states[image_start : image_start + image_length, :]
    k_query = k_states[image_start + image_length :, :]
    image_indices = (torch.norm(k_image, p=1, dim=-1).topk(pivot_image_token).indices + image_start).tolist()
    query_indices = (
        torch.norm(k_query, p=1, dim=-1).topk(pivot_text_token).indices + image_start + image_length
    ).tolist()
    indices_set = set(image_indices + query_indices)
    tmp_set = indices_set.copy()
    valid_indices = set(range(image_start, image_start + image_length))
    valid_indices.difference_update(image_indices)
    for item in pivot_order if pivot_order is not None else list(tmp_set):
        valid_indices_list = sorted(valid_indices)  # the code's `list(set)`: ascending only matters for ties
        valid_vectors = last_layer_state[valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(token_topk).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices.tolist()]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
    indices_set.difference_update(query_indices)
    return torch.tensor(sorted(indices_set)) - image_start


def dart_pivot_order(k_states: torch.Tensor, image_start: int, image_length: int, pivots: tuple[int, int]) -> list[int]:
    """Rows of DART's pivots, image pivots then text pivots, each by descending key L1 norm (vlmprune's order)."""
    k_states = k_states.permute(1, 0, 2).reshape(k_states.shape[1], -1)
    norms = torch.norm(k_states, p=1, dim=-1)
    image = torch.sort(norms[image_start : image_start + image_length], descending=True, stable=True).indices
    text = torch.sort(norms[image_start + image_length :], descending=True, stable=True).indices
    return (image[: pivots[0]] + image_start).tolist() + (text[: pivots[1]] + image_start + image_length).tolist()


def cdpruner_keep(
    image_features: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor, visual_token_num: int
) -> torch.Tensor:
    """`encode_images` of CDPruner on one image: (N, D) projected features, (N, C) image and (M, C) text embeddings
    in the relevance space; ascending kept indices."""
    image_features, image_embeds = image_features[None], image_embeds[None]
    B, N, _ = image_features.shape
    image_normalized = (image_features / image_features.norm(dim=-1, keepdim=True)).float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (-relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((visual_token_num, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (
            kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])
        ) / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float("inf")
    return torch.sort(select_idx.t()).values[0]


def visionzip_tokens(
    hidden_states: torch.Tensor,
    attn_weights: torch.Tensor,
    metric: torch.Tensor,
    dominant_num: int,
    contextual_num: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`CLIPVisionTower_VisionZip.forward` on one image, transcribed: ((1 + dominant + contextual, C) tokens, the
    [CLS] first, the dominant patches in raster order, then the contextual tokens; the kept `all_indices`).

    `hidden_states` (1 + N, C) are the feature layer's output, `attn_weights` (heads, 1 + N, 1 + N) its attention,
    `metric` (1 + N, head_dim) its keys averaged over heads (`raw_key_states.mean(1)`)."""
    hidden_states, attn_weights, metric = hidden_states[None], attn_weights[None], metric[None]
    cls_idx = 0
    cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1 :]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((1, 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(1, dominant_num + 1, hidden_states.shape[2])
    metric_filtered = metric[mask].view(1, hidden_states.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
        1, hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2]
    )
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, others, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(1, tokens_to_merge.shape[1], contextual_num, dtype=hidden_states_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, others, :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    return torch.cat([dominant_tokens, contextual_tokens], dim=1)[0], all_indices[0]


def sparsevlm_noise(r: int) -> torch.Tensor:
    """A draw of the code's density noise `torch.rand(r) * 1e-6` that favours the tokens handed over first (the
    most relevant): the draw for which the code decides ties as vlmprune does."""
    return 1e-6 * (1 - torch.arange(r) / r)


def sparsevlm_raters(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Indices into the text after the image of its raters: `m_v_t = v_t @ t_t.T`, softmax over the text, mean over
    the image tokens, `where(m_v_t > m_v_t.mean())`. image (N, D), text (T, D)."""
    relevance = torch.softmax(image_embeds @ text_embeds.T, dim=1).mean(dim=0)
    return torch.where(relevance > relevance.mean())[0]


def sparsevlm_cut(
    attention: torch.Tensor,
    image: slice,
    raters: torch.Tensor,
    count: int | None,
    *,
    recycle_share: float = 0.3,
    adaptive: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(indices into the image kept by relevance, ascending; indices of the recycled pruned tokens, most relevant
    first, or None when the stage cuts nothing) from `attention` (heads, L, L), the raters' absolute rows.

    `attn_postprocess_topk`: head mean, rows of the raters, columns of the image, mean over raters; `topk` of
    `min(count, n - 1)`. With `adaptive=(scale, bias)`, `attn_postprocess_rank`: the count is `int(rank * scale +
    bias)` of `matrix_rank` of the (raters, n) matrix, and a rank equal to n keeps all. Then the forward's
    recycling: of the pruned, `int(p * 0.3) + 1` most relevant, by `topk` over their relevance."""
    per_rater = attention.mean(dim=0)[raters][:, image]  # (raters, n)
    relation = per_rater.mean(dim=0)
    n = relation.numel()
    if adaptive is not None:
        rank = int(torch.linalg.matrix_rank(per_rater.float()))
        if n - rank == 0:
            return torch.arange(n), None
        count = int(rank * adaptive[0] + adaptive[1])
    kept = torch.topk(relation, min(count, n - 1)).indices
    policy = torch.zeros(n, dtype=torch.bool)
    policy[kept] = True
    pruned = torch.where(~policy)[0]
    take = int(pruned.shape[0] * recycle_share) + 1
    recycled = pruned[torch.topk(relation[pruned], take).indices]
    return kept.sort().values, recycled


def sparsevlm_clusters(states: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`cluster_and_merge` of the recycled tokens' states (r, C) into `int(r / 10) + 1` clusters: (centres (c,) as
    indices into the r tokens, each token's cluster (r,) as an index into the centres, merged states (c, C)).

    d = cdist / √C; density exp(−mean of the c smallest d²) + `noise` (r,), one draw of the code's
    `torch.rand(r) * 1e-6`; δ = min d to a denser token, else the max of d; centres: `topk` of δ·ρ; each token to
    its nearest centre (`argmin`), centres to themselves; merged = sum / (count + 1e-6). The noise decides ties in
    ρ, which k = c neighbours make common (one cluster: every ρ is 1; mutual nearest neighbours share theirs)."""
    r, channels = states.shape
    clusters = int(r / 10) + 1
    d = torch.cdist(states[None], states[None])[0] / channels**0.5
    nearest = torch.topk(d, k=clusters, dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1)) + noise
    denser = (density[None, :] > density[:, None]).float()
    delta = (d * denser + d.max() * (1 - denser)).min(dim=-1).values
    centres = torch.topk(delta * density, k=clusters).indices
    assignment = d[centres].argmin(dim=0)
    assignment[centres] = torch.arange(clusters)
    sizes = torch.zeros(clusters).index_add_(0, assignment, torch.ones(r)) + 1e-6
    merged = torch.zeros(clusters, channels).index_add_(0, assignment, states / sizes[assignment][:, None])
    return centres, assignment, merged
