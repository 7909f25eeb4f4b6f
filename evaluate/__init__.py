"""Scoring from cached embeddings: recall metrics, late fusion, NNN, QB-Norm and DBNorm rows, COCO 1K and ECCV
Caption protocols, the score table and plots."""
from .late_fusion import late_fusion_ranks, late_fusion_recall, standardise, tune_weights, weight_grid
from .recall import (
    recall_at_k,
    recall_curve,
    recalls_from_ranks,
    retrieval_ranks,
    retrieval_ranks_from_embeddings,
    retrieval_recall,
    retrieval_recall_from_embeddings,
)
from .rerank import hubness, nnn_recall, nnn_similarities, tune_alpha
from .table import format_markdown, format_table, write_scores

__all__ = [
    "format_markdown", "format_table", "hubness", "late_fusion_ranks", "late_fusion_recall", "nnn_recall",
    "nnn_similarities", "recall_at_k", "recall_curve", "recalls_from_ranks", "retrieval_ranks",
    "retrieval_ranks_from_embeddings", "retrieval_recall", "retrieval_recall_from_embeddings", "standardise",
    "tune_alpha", "tune_weights", "weight_grid", "write_scores",
]
