"""Retrieval metrics (paper Tables 2 and 3) and the text tables / JSON that report them; numpy only."""

from trainer.evaluation.metrics import (
    chance_recall,
    evaluate_embeddings,
    image_to_image_precision,
    keyword_precision,
    precision_at_k,
    ranks_of_ground_truth,
    recall_metrics,
    text_image_metrics,
)
from trainer.evaluation.report import (
    format_image_table,
    format_keyword_table,
    format_retrieval_table,
    write_results_json,
)

__all__ = [
    "chance_recall",
    "evaluate_embeddings",
    "format_image_table",
    "format_keyword_table",
    "format_retrieval_table",
    "image_to_image_precision",
    "keyword_precision",
    "precision_at_k",
    "ranks_of_ground_truth",
    "recall_metrics",
    "text_image_metrics",
    "write_results_json",
]
