"""Calibration metrics for categorical predictions: accuracy, NLL, ECE, Brier score."""

from __future__ import annotations

import torch
from torch import Tensor


def calibration_metrics(probs: Tensor, y: Tensor, n_bins: int = 15) -> dict[str, float]:
    """``accuracy``, ``nll`` (mean negative log probability of the label), ``ece`` (expected
    calibration error of the top-class confidence over ``n_bins`` equal-width bins) and ``brier``
    (mean over examples of ``‖p − e_y‖²``) for probabilities ``(n, k)`` and labels ``(n,)``."""
    probs = probs.detach().double()
    y = y.detach().long()
    conf, pred = probs.max(dim=-1)
    correct = (pred == y).double()
    nll = -torch.log(probs.gather(-1, y[:, None]).squeeze(-1).clamp_min(1e-12)).mean()
    onehot = torch.nn.functional.one_hot(y, probs.shape[-1]).double()
    brier = ((probs - onehot) ** 2).sum(-1).mean()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype)
    ece = probs.new_zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if inside.any():
            ece += inside.double().mean() * (correct[inside].mean() - conf[inside].mean()).abs()
    return {
        "accuracy": float(correct.mean()),
        "nll": float(nll),
        "ece": float(ece),
        "brier": float(brier),
    }
