"""Test metrics of the MAP model: accuracy, NLL, ECE (15 bins) and Brier score.

Every prediction is one categorical distribution ``p`` with an observed class ``y``: one per
document for classification, one per target token for causal LM. With ``n`` predictions,

- accuracy = mean 1[argmax p = y]; NLL = mean −log p_y;
- Brier = mean Σ_k (p_k − 1[k = y])² = mean (Σ_k p_k² − 2 p_y + 1);
- ECE = Σ_b (n_b / n) |acc_b − conf_b| over 15 equal-width bins of the confidence max_k p_k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .encode import IGNORE_INDEX


class CalibrationMeter:
    """Streams predictions in, keeping only sums (LLM logits never need to be stored)."""

    def __init__(self, n_bins: int = 15):
        self.n_bins = n_bins
        self.n = 0
        self.correct = 0.0
        self.nll = 0.0
        self.brier = 0.0
        self.bin_count = torch.zeros(n_bins, dtype=torch.float64)
        self.bin_conf = torch.zeros(n_bins, dtype=torch.float64)
        self.bin_correct = torch.zeros(n_bins, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: Tensor, y: Tensor) -> None:
        """Add predictions ``logits`` (n, K) with targets ``y`` (n,), on any device (the bin
        sums stay on the CPU)."""
        logp = torch.log_softmax(logits.double(), dim=-1)
        p = logp.exp()
        p_y = p.gather(-1, y[:, None]).squeeze(-1)
        conf, pred = p.max(-1)
        hit = (pred == y).double()
        self.n += int(y.numel())
        self.correct += float(hit.sum())
        self.nll += float(-logp.gather(-1, y[:, None]).sum())
        self.brier += float(((p**2).sum(-1) - 2 * p_y + 1).sum())
        conf, hit = conf.cpu(), hit.cpu()
        bins = torch.clamp((conf * self.n_bins).long(), max=self.n_bins - 1)
        self.bin_count += torch.bincount(bins, minlength=self.n_bins).double()
        self.bin_conf += torch.bincount(bins, weights=conf, minlength=self.n_bins)
        self.bin_correct += torch.bincount(bins, weights=hit, minlength=self.n_bins)

    def compute(self) -> dict[str, float]:
        n = max(self.n, 1)
        ece = float((self.bin_conf - self.bin_correct).abs().sum() / n)
        return {
            "accuracy": self.correct / n,
            "nll": self.nll / n,
            "ece": ece,
            "brier": self.brier / n,
            "n_predictions": self.n,
        }


def predictions(logits: Tensor, labels: Tensor, task: str) -> tuple[Tensor, Tensor]:
    """Flatten a batch into (n, K) logits and (n,) targets; causal LM shifts by one token."""
    if task == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
        mask = labels != IGNORE_INDEX
        return logits[mask], labels[mask]
    return logits, labels


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, task: str, n_bins: int = 15) -> dict[str, float]:
    """Metrics of ``model`` (in eval mode, at its current weights) over ``loader``."""
    meter = CalibrationMeter(n_bins)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in loader:
            labels = batch["labels"].to(device)
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits.float()
            meter.update(*predictions(logits, labels, task))
    finally:
        model.train(was_training)
    return meter.compute()
