"""Calibration of the MAP model and of the Laplace predictive over a data loader."""

from __future__ import annotations

import torch

from . import batches as B
from .metrics import calibration_metrics


def calibration_report(
    lap, loader, pred_type="glm", link_approx="probit", n_samples=100, generator=None, gather=None
) -> dict[str, float]:
    """``accuracy``, ``nll``, ``ece``, ``brier`` of the MAP model (softmax of the logits) and
    the same with a ``laplace_`` prefix for the Laplace predictive ``lap(batch, ...)``, over the
    examples of ``loader`` with a label (classification). ``gather``: applied to each batch's
    ``(MAP probabilities, Laplace probabilities, labels)`` (the Trainer's
    ``accelerator.gather_for_metrics``, where ``loader`` is this process's shard), so that the
    metrics are those of the whole split on every process."""
    model = lap.model
    map_probs, lap_probs, labels = [], [], []
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            inputs, y = B.split_batch(batch, lap.dict_key_x, lap.dict_key_y)
            inputs = B.to_device(inputs, lap.device)
            with torch.no_grad():
                logits = B.call_model(model, inputs, lap.dict_key_x)
            probs = lap(
                inputs,
                pred_type=pred_type,
                link_approx=link_approx,
                n_samples=n_samples,
                generator=generator,
            )
            batch_probs = (torch.softmax(logits.double(), -1), probs.double())
            y = y.to(probs.device)
            if gather is not None:
                *batch_probs, y = gather((*batch_probs, y))
            keep = y != B.IGNORE_INDEX
            map_probs.append(batch_probs[0][keep].cpu())
            lap_probs.append(batch_probs[1][keep].cpu())
            labels.append(y[keep].cpu())
    finally:
        model.train(was_training)
    y = torch.cat(labels)
    report = calibration_metrics(torch.cat(map_probs), y)
    report.update(
        {f"laplace_{k}": v for k, v in calibration_metrics(torch.cat(lap_probs), y).items()}
    )
    return report
