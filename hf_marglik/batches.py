"""Batches, model calls and targets: the one place that knows how a batch is laid out.

A batch is either a mapping (Hugging Face style: the targets under ``dict_key_y``, every other
key is a model input) or an ``(x, y)`` sequence. A model is called with keyword arguments when its
``forward`` names ``dict_key_x`` (Hugging Face and peft models), otherwise with the mapping itself
(laplace-torch's convention for models that take a ``MutableMapping``), or with ``x`` for tuples.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .options import Likelihood

IGNORE_INDEX = -100


def split_batch(batch, dict_key_x: str, dict_key_y: str) -> tuple[object, Tensor]:
    """Split ``batch`` into model inputs and targets; a clear error if the targets are missing."""
    if isinstance(batch, Mapping):
        if dict_key_y not in batch:
            keys = ", ".join(repr(k) for k in batch.keys())
            raise KeyError(
                f"The batch has no targets under dict_key_y={dict_key_y!r}; its keys are {keys}. "
                "Set dict_key_y to the key that holds the labels."
            )
        inputs = {k: v for k, v in batch.items() if k != dict_key_y}
        if dict_key_x not in inputs:
            keys = ", ".join(repr(k) for k in inputs.keys())
            raise KeyError(
                f"The batch has no inputs under dict_key_x={dict_key_x!r}; its keys are {keys}. "
                "Set dict_key_x to the key that holds the model's main input."
            )
        return inputs, batch[dict_key_y]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"A batch must be a mapping (with the targets under dict_key_y) or an (x, y) pair; "
        f"got {type(batch).__name__}."
    )


def batch_size(inputs, dict_key_x: str) -> int:
    x = inputs[dict_key_x] if isinstance(inputs, Mapping) else inputs
    return int(x.shape[0])


def to_device(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _takes_keywords(model: nn.Module, dict_key_x: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    if dict_key_x in params:
        return True
    # wrappers that forward(*args, **kwargs) to an inner model: peft (base_model), DDP and
    # accelerate (module): look through them
    for attr in ("module", "base_model"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and inner is not model:
            return _takes_keywords(inner, dict_key_x)
    return False


def call_model(model: nn.Module, inputs, dict_key_x: str) -> Tensor:
    """Run ``model`` on ``inputs`` and return its logits tensor.

    Hugging Face outputs give ``.logits``; the targets are never passed in, so ``output[0]`` is
    never a loss.
    """
    if isinstance(inputs, Mapping):
        out = model(**inputs) if _takes_keywords(model, dict_key_x) else model(inputs)
    else:
        out = model(inputs)
    return output_logits(out)


def output_logits(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"Cannot find logits in the model output of type {type(out).__name__}.")


@dataclass
class Targets:
    """Logits and targets laid out as independent data points.

    ``logits`` has shape ``(n, ..., k)`` and ``y`` the matching leading shape; ``mask`` (bool, the
    leading shape) marks the entries that are data; ``n_data`` is their count.
    """

    logits: Tensor
    y: Tensor
    mask: Tensor
    n_data: int


def targets_for(
    logits: Tensor, y: Tensor, likelihood: Likelihood, attention_mask: Tensor | None = None
) -> Targets:
    """Align logits with targets for ``likelihood`` and check that their shapes agree.

    causal_lm: ``logits[:, :-1]`` predicts ``y[:, 1:]``; positions labelled -100 or padded out by
    ``attention_mask`` are not data. classification: one label per example. regression: one
    target vector per example (a 1-d target is read as one output).
    """
    if likelihood == Likelihood.CAUSAL_LM:
        if logits.ndim != 3 or y.ndim != 2 or logits.shape[:2] != y.shape:
            raise ValueError(
                f"likelihood='causal_lm' needs logits (batch, seq, vocab) and labels (batch, seq); "
                f"got logits {tuple(logits.shape)} and labels {tuple(y.shape)}."
            )
        lg, yy = logits[:, :-1, :], y[:, 1:]
        mask = yy != IGNORE_INDEX
        if attention_mask is not None:
            mask = mask & attention_mask[:, 1:].bool()
        _check_class_range(yy[mask], lg.shape[-1])
        return Targets(lg, torch.where(mask, yy, 0), mask, int(mask.sum()))
    if likelihood == Likelihood.CLASSIFICATION:
        if logits.ndim != 2 or y.ndim != 1 or y.shape[0] != logits.shape[0]:
            raise ValueError(
                f"likelihood='classification' needs logits (batch, classes) and labels (batch,); "
                f"got logits {tuple(logits.shape)} and labels {tuple(y.shape)}. For token-level "
                "targets use likelihood='causal_lm'."
            )
        mask = y != IGNORE_INDEX
        _check_class_range(y[mask], logits.shape[-1])
        return Targets(logits, torch.where(mask, y, 0), mask, int(mask.sum()))
    if likelihood == Likelihood.REGRESSION:
        yy = y.unsqueeze(-1) if y.ndim == logits.ndim - 1 else y
        if logits.ndim != 2 or yy.shape != logits.shape:
            raise ValueError(
                f"likelihood='regression' needs outputs (batch, outputs) and targets of the same "
                f"shape; got outputs {tuple(logits.shape)} and targets {tuple(y.shape)}."
            )
        mask = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        return Targets(logits, yy.to(logits.dtype), mask, int(logits.shape[0]))
    raise ValueError(f"unknown likelihood {likelihood!r}")


def _check_class_range(y: Tensor, n_classes: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(
            f"Labels must lie in [0, {n_classes - 1}] (or be -100 to be ignored); found labels in "
            f"[{int(y.min())}, {int(y.max())}]. Check num_labels of the model's head."
        )


def nll_sum(t: Targets, weights: Tensor | None = None) -> Tensor:
    """Negative log likelihood summed over the data points, at unit noise for regression:
    cross-entropy for categorical likelihoods, ``½‖f − y‖²`` for regression. ``weights`` (the
    shape of ``t.mask``): a weighted sum."""
    m = t.mask if weights is None else t.mask * weights.to(t.logits.dtype)
    if t.logits.ndim >= 2 and t.y.dtype in (torch.long, torch.int, torch.int32):
        logp = torch.log_softmax(t.logits, dim=-1)
        nll = -logp.gather(-1, t.y.unsqueeze(-1)).squeeze(-1)
        return (nll * m).sum()
    if weights is None:
        return 0.5 * ((t.logits - t.y) ** 2).sum()
    return 0.5 * (((t.logits - t.y) ** 2).sum(-1) * m).sum()
