"""Criteria: small pieces that choose image tokens, usable in any stage of any method."""

from vlmprune.criteria.attention import Attention
from vlmprune.criteria.balanced import Balanced
from vlmprune.criteria.base import Criterion, ScoredCriterion, SelectionContext
from vlmprune.criteria.dpp import ConditionalDPP
from vlmprune.criteria.ensemble import Ensemble
from vlmprune.criteria.knn import KnnDensity
from vlmprune.criteria.merging import DominantContextual, GridPool
from vlmprune.criteria.pivots import PivotDissimilarity
from vlmprune.criteria.random import RandomScore
from vlmprune.criteria.sparsevlm import TextRaterAttention
from vlmprune.criteria.uniform import Uniform
from vlmprune.criteria.visual_cues import ImportantDiverse, VisionAttention

__all__ = [
    "Attention",
    "Balanced",
    "ConditionalDPP",
    "Criterion",
    "DominantContextual",
    "Ensemble",
    "GridPool",
    "ImportantDiverse",
    "KnnDensity",
    "PivotDissimilarity",
    "RandomScore",
    "ScoredCriterion",
    "SelectionContext",
    "TextRaterAttention",
    "Uniform",
    "VisionAttention",
]
