"""Curvature-weighted subsets: which training examples a cheap curvature fit looks at.

A fit on part of the training data (``marglik_subset``) estimates the curvature sum
``Σ_n H_n`` from a sample. Sampled uniformly, most of the sample goes to examples the model
already fits confidently, whose GGN is close to zero (the softmax Hessian ``diag(p) − ppᵀ``
vanishes as ``p`` becomes one-hot), while the few uncertain examples that carry most of the
curvature are in or out by chance: that chance is the error of a uniform subset.

``sampling="curvature"`` includes example ``n`` with probability ``π_n`` proportional to its
output curvature ``tr Λ_n = 1 − Σ_c p_c²`` (plus a floor, 5% of the mean, so that every
example can be drawn), capped at 1, scaled so that ``Σ π_n`` is the subset size; a drawn example
is weighted by ``1 / π_n`` (Poisson sampling, Horvitz–Thompson weights). The estimate stays
unbiased whatever the ``π_n`` are; its variance is small when ``π_n`` is close to proportional to
the example's share of the curvature. ``p`` is taken from the logits of the training forward
pass that last saw the example (free; at most an epoch old). Examples are recognised by a hash
of their input (the non-padding tokens of ``dict_key_x``, or its raw values for other inputs),
so shuffling, padding, sharding and column removal by the Trainer do not matter; a collator
that changes the input itself (random masking or augmentation) makes examples unrecognisable,
and those get the mean recorded curvature. Classification only: for regression ``Λ`` is constant, and a causal LM
would need a softmax over the vocabulary per token.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

FLOOR = 0.05  # share of the mean curvature given to every example


def row_keys(x: Tensor, mask: Tensor | None = None) -> list[int]:
    """One key per example (row) of the model input ``x``: a hash of its values; for token ids
    (``n × T`` integers) with a ``mask`` of the same shape, of the tokens where the mask is
    nonzero, so that a row's key does not depend on its padding."""
    x = torch.as_tensor(x).detach().to("cpu")
    if not x.is_floating_point():
        x = x.to(torch.int64)
    elif x.dtype == torch.bfloat16:
        x = x.view(torch.int16)  # numpy has no bfloat16: hash the raw bits
    use_mask = mask is not None and x.ndim == 2 and tuple(mask.shape) == tuple(x.shape)
    m = torch.as_tensor(mask).detach().to("cpu").bool() if use_mask else None
    keys = []
    for n in range(x.shape[0]):
        row = (x[n] if m is None else x[n][m[n]]).contiguous()
        digest = hashlib.blake2b(row.numpy().tobytes(), digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little") >> 1)  # 63 bits: fits an int64 tensor
    return keys


def example_key(example, dict_key_x: str) -> int | None:
    """The key of one dataset item (a dict with ``dict_key_x`` and maybe ``attention_mask``),
    the same as :func:`row_keys` gives its row in a collated batch; ``None`` when the item
    has nothing under ``dict_key_x`` that converts to a tensor."""
    if not isinstance(example, Mapping) or dict_key_x not in example:
        return None
    try:
        x = torch.as_tensor(example[dict_key_x])
    except (TypeError, ValueError, RuntimeError):
        return None
    mask = example.get("attention_mask")
    mask = None if mask is None else torch.as_tensor(mask).unsqueeze(0)
    return row_keys(x.unsqueeze(0), mask)[0]


def output_curvature(logits: Tensor) -> Tensor:
    """``tr Λ_n = 1 − Σ_c p_c²`` per example of classification logits ``n × C``."""
    p = torch.softmax(logits.detach().float(), dim=-1)
    return 1.0 - (p * p).sum(-1)


def inclusion_probabilities(scores: Tensor, expected: float, floor: float = FLOOR) -> Tensor:
    """``π_n ∝ scores_n + floor · mean(scores)``, capped at 1, with ``Σ π_n = expected``."""
    n = scores.numel()
    if expected >= n:
        return torch.ones(n, dtype=torch.float64)
    x = scores.double().clamp_min(0.0)
    x = x + floor * x.mean() + (1e-12 if float(x.sum()) == 0.0 else 0.0)
    capped = torch.zeros(n, dtype=torch.bool)
    while True:
        free = ~capped
        pi = torch.where(capped, torch.ones_like(x), x * (expected - capped.sum()) / x[free].sum())
        over = free & (pi > 1.0)
        if not over.any():
            return pi.clamp(max=1.0)
        capped |= over


def draw(pi: Tensor, generator: torch.Generator) -> tuple[list[int], list[float]]:
    """Poisson sampling: the drawn indices (each ``n`` independently with probability ``π_n``;
    at least one) and their Horvitz–Thompson weights ``1 / π_n``."""
    u = torch.rand(pi.numel(), generator=generator, dtype=torch.float64)
    take = (u < pi).nonzero().flatten()
    if take.numel() == 0:
        take = pi.argmax().reshape(1)
    return [int(i) for i in take], [float(1.0 / pi[i]) for i in take]


def subset_size(fraction: float, n: int) -> int:
    """``marglik_subset`` as a number of examples: a fraction in (0, 1] or a count above 1."""
    return max(1, math.ceil(fraction * n)) if fraction <= 1 else min(int(fraction), n)


class CurvatureSubset:
    """The trainer's curvature-weighted subset: records ``tr Λ_n`` of every training example
    from the training forward passes (:meth:`record`) and draws a fresh weighted subset for
    each fit (:meth:`draw_subset`). Examples not seen yet (the first fit of a run resumed from
    an older checkpoint) get the mean recorded curvature."""

    def __init__(self, dataset, fraction: float, dict_key_x: str, seed: int):
        self.dataset, self.dict_key_x, self.seed = dataset, dict_key_x, seed
        self.size = subset_size(fraction, len(dataset))
        self.scores: dict[int, float] = {}
        self.seen_at: dict[int, int] = {}  # the training step that recorded each score
        self._keys: list[int] | None = None

    def keys(self) -> list[int] | None:
        """The key of every dataset example (computed once), or None when some example has no
        tensor-like input under ``dict_key_x`` (then the subset is drawn uniformly)."""
        if self._keys is None:
            keys = [example_key(self.dataset[n], self.dict_key_x) for n in range(len(self.dataset))]
            if any(k is None for k in keys):
                warnings.warn(
                    f"marglik_subset_sampling='curvature' needs the model input under dict_key_x="
                    f"{self.dict_key_x!r} in every training example to recognise it; drawing the "
                    "curvature subset uniformly instead.",
                    UserWarning,
                    stacklevel=3,
                )
                keys = []
            self._keys = keys
        return self._keys or None

    def record(self, ids: Tensor, mask: Tensor | None, logits: Tensor, step: int) -> None:
        """Record ``tr Λ_n`` of the examples of a training batch from their logits."""
        for k, v in zip(row_keys(ids, mask), output_curvature(logits).tolist()):
            self.scores[k], self.seen_at[k] = v, step

    def draw_subset(self, step: int) -> tuple[object, Callable[[Mapping], Tensor] | None]:
        """A subset of the dataset drawn with ``π_n ∝ tr Λ_n`` (the same on every process) and
        the function giving each batch's Horvitz–Thompson weights ``1 / π_n``."""
        keys = self.keys()
        n = len(self.dataset)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        scores = self._gathered()
        if keys is None or not scores:
            pi = torch.full((n,), self.size / n, dtype=torch.float64)
        else:
            fill = sum(scores.values()) / len(scores)
            pi = inclusion_probabilities(
                torch.tensor([scores.get(k, fill) for k in keys], dtype=torch.float64), self.size
            )
        idx, weights = draw(pi, g)
        if keys is None:  # equal weights: the rescaling to the full data count does it
            return select_examples(self.dataset, idx), None
        table = {keys[i]: w for i, w in zip(idx, weights)}
        mean = sum(weights) / len(weights)
        key_x = self.dict_key_x

        def example_weights(batch) -> Tensor:
            got = [table.get(k) for k in row_keys(batch[key_x], batch.get("attention_mask"))]
            if any(w is None for w in got):
                warnings.warn(
                    "A curvature-subset example came out of the data collator changed, so its "
                    "sampling weight is unknown; it gets the subset's mean weight.",
                    UserWarning,
                    stacklevel=2,
                )
            return torch.tensor([mean if w is None else w for w in got], dtype=torch.float64)

        return select_examples(self.dataset, idx), example_weights

    def _gathered(self) -> dict[int, float]:
        """The scores recorded by all data-parallel processes (each saw its shard)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.scores
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.scores, self.seen_at))
        merged: dict[int, float] = {}
        latest: dict[int, int] = {}
        for scores, seen_at in parts:  # the latest record of an example wins
            for k, v in scores.items():
                if seen_at[k] >= latest.get(k, -1):
                    merged[k], latest[k] = v, seen_at[k]
        return merged

    def state_dict(self) -> dict:
        keys = list(self.scores)
        return {
            "keys": torch.tensor(keys, dtype=torch.int64),
            "scores": torch.tensor([self.scores[k] for k in keys], dtype=torch.float64),
            "seen_at": torch.tensor([self.seen_at[k] for k in keys], dtype=torch.int64),
        }

    def load_state_dict(self, sd: dict) -> None:
        keys = sd["keys"].tolist()
        self.scores = dict(zip(keys, sd["scores"].tolist()))
        self.seen_at = dict(zip(keys, sd["seen_at"].tolist()))


def select_examples(dataset, idx: list[int]):
    """The examples ``idx`` of a ``datasets.Dataset`` or a torch dataset."""
    if hasattr(dataset, "select"):  # datasets.Dataset
        return dataset.select(idx)
    return torch.utils.data.Subset(dataset, idx)
