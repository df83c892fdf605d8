"""Classification metrics for model cards (torchmetrics)."""
from __future__ import annotations

import torch
from torchmetrics.classification import BinaryAUROC, BinaryROC


def classification_metrics(probabilities: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float]:
    probabilities = probabilities.float().cpu()
    labels = labels.long().cpu()
    predicted = probabilities >= threshold
    positives = labels == 1
    tp = int((predicted & positives).sum())
    tn = int((~predicted & ~positives).sum())
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return {
        "auroc": float(BinaryAUROC()(probabilities, labels)),
        "accuracy": (tp + tn) / max(1, len(labels)),
        "sensitivity": tp / max(1, n_pos),
        "specificity": tn / max(1, n_neg),
        "threshold": float(threshold),
        "n": int(len(labels)),
        "n_positive": n_pos,
        "n_negative": n_neg,
    }


def youden_threshold(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Threshold maximising sensitivity + specificity - 1 on a validation split."""
    fpr, tpr, thresholds = BinaryROC()(probabilities.float().cpu(), labels.long().cpu())
    best = int(torch.argmax(tpr - fpr))
    return float(min(1.0, max(0.0, thresholds[best])))
