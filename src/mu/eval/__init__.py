"""Evaluation: task metrics (`metrics`) and model evaluation with batched cached generation (`runner`)."""

from mu.eval.metrics import (codexglue_bleu4, compute_metrics, normalize_answer, rouge_metrics, sacrebleu_score,
                             squad_v2_metrics)
from mu.eval.runner import evaluate_model, generate_predictions

__all__ = ["codexglue_bleu4", "compute_metrics", "evaluate_model", "generate_predictions", "normalize_answer",
           "rouge_metrics", "sacrebleu_score", "squad_v2_metrics"]
