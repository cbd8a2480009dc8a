"""The memory the curvature of marginal-likelihood training will hold, planned before training.

:func:`estimate_curvature_memory` is arithmetic over the trainable tensors' shapes and the
settings (nothing runs through the model). It counts the tensors that hf_marglik itself
allocates for the Laplace approximation, in the dtype it allocates them in (float64 for a
float64 model, float32 otherwise, bf16/fp16 models included):

* **accumulators**: the running sums of one fit (a pass, or the online window, which lives
  through training): K-FAC ``Σ a aᵀ`` per linear layer's input and ``Σ g gᵀ`` per output
  (``d²`` each; with ``factor_rank`` a factor wider than ``2·rank + 10`` is a sketch ``Y`` and
  its test matrix ``Ω``, ``2·d·(rank + 10)``); the diagonal (``P``); the dense ``P × P`` matrix.
* **posterior**: one fitted posterior: per factor its eigenvalues (``d``) and eigenvectors
  (``d²``, or ``d·rank`` for a sketched factor), and the ``P`` eigenvalue products with their
  block index (int64) that the log determinant reads; ``h`` (diag); ``H`` (full); with a diagonal
  prior on K-FAC the dense blocks (``Σ numel²``) it factorises. Training keeps up to
  :data:`KEPT_POSTERIORS` fits (the last update's and the best one's, :mod:`hf_marglik.loop`)
  while the next is made.
* transients, of which the largest counts: **decomposition** (the scaled and symmetrised copies
  of the widest factor plus LAPACK ``syevd``'s documented workspace ``1 + 6d + 2d²``; for
  ``full`` the scaled and symmetrised ``P × P`` copies); **hyper_steps** (the autograd
  tensors of one step on the log marginal likelihood: a few ``P``-vectors, for ``full`` a few
  ``P × P`` matrices, the Cholesky factor among them); **accumulation** (diag / full: the
  per-example gradients ``batch × P`` of a column, twice); **predictive** (one evaluation batch
  of the GLM predictive: the Jacobians ``batch × outputs × P_pred`` in ``evaluate()``, over the
  tensors of ``predictive_subset_of_weights``, with their per-output rows and whitened copies;
  ``pred_type="nn"``: :data:`~hf_marglik.predictive.SAMPLE_CHUNK` parameter draws);
  **validation_cache** (``predictive_prior="gridsearch"``: the Jacobians of the whole
  ``eval_dataset``, kept for the grid).

``peak = accumulators + KEPT_POSTERIORS·posterior + max(accumulation, posterior +
max(decomposition, hyper_steps), predictive, validation_cache)``.

Not counted: the model, its optimizer state and activations (a training step needs them
anyway; a K-FAC curvature pass holds about a training step's activations, docs/scale.md), and
the sharing of one input factor by layers that read the same tensor (LoRA ``A`` of ``q_proj``
and ``v_proj``): that is seen only in the forward pass, so the estimate counts each layer's
own, an upper bound.

:func:`check_memory` logs the plan (one info block) and refuses, with a ``ValueError``, a peak
above the budget (``marglik_memory_budget``, or what the device can spare:
:func:`device_budget`). The trainers call it when training starts, before any step.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from .curvature import linear_sites
from .factors import OVERSAMPLE
from .options import (
    CurvatureSource,
    HessianStructure,
    Likelihood,
    PredictivePrior,
    PredType,
    PriorStructure,
    SubsetOfWeights,
    coerce,
)
from .predictive import SAMPLE_CHUNK
from .prior import select_parameters, trainable_parameters

logger = logging.getLogger(__name__)

KEPT_POSTERIORS = 2
"""Fits the training loop keeps while it makes the next: the last update's and the best
update's (:meth:`hf_marglik.loop.MargLikLoop.update`)."""

CPU_MEMORY_FRACTION = 0.8
"""Share of the available system memory (``MemAvailable``) that the default budget gives the
curvature on CPU; the rest is left to activations, the optimizer and other processes."""

HYPER_STEP_VECTORS = 8
"""``P``-vectors alive in one hyper-step's forward and backward (K-FAC, diag): the eigenvalue
products shifted by the prior, their logarithm, the prior expanded per parameter, their
gradients."""

HYPER_STEP_MATRICES = 6
"""``P × P`` matrices alive in one hyper-step of ``full`` (``f·H``, the prior's diagonal, their
sum, its Cholesky factor, and the Cholesky backward's products)."""

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: int | float | str) -> int:
    """Bytes from an int or a string with a unit: ``"8GB"`` (10⁹), ``"500MiB"`` (2²⁰),
    ``"1.5 GiB"``, ``"123"``; units are case-insensitive (B, KB, MB, GB, TB; KiB … TiB)."""
    if isinstance(value, bool):
        raise ValueError(f"marglik_memory_budget={value!r} is not a number of bytes.")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"marglik_memory_budget={value!r} is not a size; give bytes as an int or a "
                "string such as '8GB', '500MiB' or '1.5GiB'."
            )
        number, unit = float(m.group(1)), m.group(2).lower()
    n = int(number * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"marglik_memory_budget={value!r} must be positive.")
    return n


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of the curvature's tensors (see the module docstring for each term)."""

    dtype: torch.dtype
    n_params: int
    n_predictive_params: int
    accumulators: int
    posterior: int
    decomposition: int
    hyper_steps: int
    accumulation: int
    predictive: int
    validation_cache: int
    kept_posteriors: int = KEPT_POSTERIORS

    @property
    def peak(self) -> int:
        """The most bytes held at once: the accumulators and the kept posteriors, plus the
        largest transient (a new posterior with its decomposition or hyper-steps, a batch's
        per-example gradients, the predictive's Jacobians)."""
        return (
            self.accumulators
            + self.kept_posteriors * self.posterior
            + max(
                self.accumulation,
                self.posterior + max(self.decomposition, self.hyper_steps),
                self.predictive,
                self.validation_cache,
            )
        )

    def summary(self) -> str:
        """The plan as an indented block of lines (the trainers' info log)."""
        b = format_bytes
        lines = [
            f"curvature memory plan ({self.n_params:,} trainable parameters, "
            f"{str(self.dtype).removeprefix('torch.')}): peak {b(self.peak)}",
            f"  accumulators (fit or online window): {b(self.accumulators)}",
            f"  posterior, per fit: {b(self.posterior)} (up to {self.kept_posteriors} kept "
            "while the next is made)",
            f"  decomposition (transient): {b(self.decomposition)}",
            f"  hyper-steps (transient): {b(self.hyper_steps)}",
        ]
        if self.accumulation:
            lines.append(f"  per-example gradients (transient): {b(self.accumulation)}")
        if self.predictive:
            lines.append(
                f"  predictive, per eval batch ({self.n_predictive_params:,} parameters): "
                f"{b(self.predictive)}"
            )
        else:
            lines.append("  predictive: none (evaluate() reports no Laplace predictive)")
        if self.validation_cache:
            lines.append(f"  gridsearch Jacobians of eval_dataset: {b(self.validation_cache)}")
        return "\n".join(lines)


def estimate_curvature_memory(
    model: nn.Module, args, *, n_outputs: int | None = None, n_eval: int | None = None
) -> MemoryPlan:
    """The :class:`MemoryPlan` of marginal-likelihood training of ``model``'s trainable tensors
    with ``args`` (a :class:`~hf_marglik.MargLikTrainingArguments`, or any object with its
    fields). ``n_outputs``: outputs per example of the GLM predictive (default: the model
    config's ``num_labels``, else the last linear layer's width); ``n_eval``: examples of the
    eval dataset (for ``predictive_prior="gridsearch"``; 0 if unknown)."""
    named = trainable_parameters(model)
    params = [p for _, p in named]
    sizes = [p.numel() for p in params]
    P = sum(sizes)
    dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    s = torch.finfo(dtype).bits // 8
    structure = coerce(HessianStructure, args.hessian_structure, "hessian_structure")
    rank = args.factor_rank
    online = coerce(CurvatureSource, args.marglik_curvature, "marglik_curvature")
    online = online == CurvatureSource.ONLINE
    batch = args.per_device_train_batch_size if online else args.per_device_eval_batch_size

    if structure == HessianStructure.KRON:
        sides = []  # one input and one output factor per linear layer (no sharing assumed)
        for site in linear_sites(model, named):
            sides += [site.module.in_features, site.module.out_features]
        sketched = [rank is not None and d > 2 * rank + OVERSAMPLE for d in sides]
        accumulators = sum(
            (2 * d * (rank + OVERSAMPLE) + 1 if sk else d * d) * s for d, sk in zip(sides, sketched)
        )
        posterior = sum((d + (d * rank if sk else d * d)) * s for d, sk in zip(sides, sketched))
        posterior += P * (s + 8)  # eigenvalue products and their block index (int64)
        prior = coerce(PriorStructure, args.prior_structure, "prior_structure")
        dense_blocks = sum(n * n for n in sizes) * s if prior == PriorStructure.DIAG else 0
        posterior += dense_blocks
        decomposition = max(
            [_eigh_transient(d, rank if sk else None, s) for d, sk in zip(sides, sketched)]
            + [P * s]  # the per-block eigenvalue products before they are joined
        )
        hyper_steps = HYPER_STEP_VECTORS * P * s + 2 * dense_blocks
        accumulation = 0
    elif structure == HessianStructure.DIAG:
        accumulators, posterior, decomposition = P * s, P * s, 0
        hyper_steps = HYPER_STEP_VECTORS * P * s
        accumulation = 2 * batch * P * s  # a column's per-example gradients, and joined
        if online:
            accumulation += accumulators  # a new window is made before the old one is freed
    else:
        accumulators = posterior = P * P * s
        decomposition = 2 * P * P * s  # H·scale and H + Hᵀ, then the posterior's ½(H + Hᵀ)
        hyper_steps = HYPER_STEP_MATRICES * P * P * s
        accumulation = 2 * batch * P * s + (accumulators if online else 0)

    pred = select_parameters(named, args.predictive_subset_of_weights)
    P_pred = sum(sizes[i] for i in pred)
    predictive = validation_cache = 0
    likelihood = coerce(Likelihood, args.likelihood, "likelihood")
    if likelihood == Likelihood.CLASSIFICATION and args.eval_laplace:
        k = _n_outputs(model) if n_outputs is None else int(n_outputs)
        b = args.per_device_eval_batch_size
        if coerce(PredType, args.pred_type, "pred_type") == PredType.GLM:
            widest = max(sizes[i] for i in pred)
            if structure == HessianStructure.KRON:
                # rows per output and their stack; then the stack, the whitened blocks so far
                # and the widest block's rotations
                extra = 3 * b * k * widest * s
            else:
                extra = b * k * P_pred * s  # the joined rows (and for full, a triangular solve)
            predictive = 2 * b * k * P_pred * s + extra
            if args.predictive_prior == PredictivePrior.GRIDSEARCH and n_eval:
                validation_cache = n_eval * k * P_pred * s + predictive
        else:  # parameter draws, a saved copy and the mean
            predictive = (SAMPLE_CHUNK + 2) * P_pred * s
        if pred != list(range(len(sizes))) and structure == HessianStructure.KRON:
            predictive += P_pred * (s + 8)  # the restricted posterior's eigenvalue products
    return MemoryPlan(
        dtype=dtype,
        n_params=P,
        n_predictive_params=P_pred,
        accumulators=accumulators,
        posterior=posterior,
        decomposition=decomposition,
        hyper_steps=hyper_steps,
        accumulation=accumulation,
        predictive=predictive,
        validation_cache=validation_cache,
    )


def _eigh_transient(d: int, rank: int | None, s: int) -> int:
    """Bytes beyond the posterior's own factor while a factor of side ``d`` is decomposed.
    Dense: the scaled copy, its symmetrised copy and LAPACK ``syevd``'s workspace
    (``1 + 6d + 2d²`` numbers, ``3 + 5d`` int32). Sketched (float64 throughout): about six
    ``d × (rank + OVERSAMPLE)`` matrices (``Y``, ``Ω``, the shifted ``Y``, the triangular solve,
    the SVD's factors)."""
    if rank is None:
        return (2 * d * d + 1 + 6 * d + 2 * d * d) * s + (3 + 5 * d) * 4
    return 6 * d * (rank + OVERSAMPLE) * 8


def _n_outputs(model: nn.Module) -> int:
    """Outputs per example: the config's ``num_labels``, else the last linear layer's width."""
    config = getattr(model, "config", None)
    k = getattr(config, "num_labels", None)
    if isinstance(k, int) and k > 0:
        return k
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 1


def device_budget(device: torch.device) -> tuple[int | None, str]:
    """What ``device`` can spare, and where the number comes from. CUDA: the free memory
    (``torch.cuda.mem_get_info``) plus what torch's allocator has reserved and not used; CPU:
    ``MemAvailable`` (``/proc/meminfo``, else ``psutil``) times :data:`CPU_MEMORY_FRACTION`.
    ``(None, reason)`` where it is not known (another accelerator, no ``/proc``)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached), f"free memory of {device}"
    if device.type == "cpu":
        available = _mem_available()
        if available is None:
            return None, "available system memory unknown"
        share = int(available * CPU_MEMORY_FRACTION)
        return share, f"{CPU_MEMORY_FRACTION:.0%} of the available system memory"
    return None, f"free memory of {device.type} unknown"


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def check_memory(model: nn.Module, args, eval_dataset=None) -> MemoryPlan:
    """Log the :class:`MemoryPlan` (one info block) and raise a ``ValueError`` naming the
    settings that shrink it when its peak exceeds the budget: ``args.marglik_memory_budget``
    (bytes), or, when that is None, what the trainable parameters' device can spare
    (:func:`device_budget`; no check where that is unknown)."""
    try:  # a dict of eval datasets gets no Laplace metrics; an iterable one has no length
        n_eval = 0 if eval_dataset is None or isinstance(eval_dataset, dict) else len(eval_dataset)
    except TypeError:
        n_eval = 0
    plan = estimate_curvature_memory(model, args, n_eval=n_eval)
    budget = getattr(args, "marglik_memory_budget", None)
    if budget is not None:
        budget, source = parse_bytes(budget), "marglik_memory_budget"
    else:
        device = next(p.device for _, p in trainable_parameters(model))
        budget, source = device_budget(device)
    where = "no budget known" if budget is None else f"budget {format_bytes(budget)} ({source})"
    logger.info("%s\n  %s", plan.summary(), where)
    if budget is not None and plan.peak > budget:
        raise ValueError(
            f"The curvature of marginal-likelihood training needs about {plan.peak:,} bytes "
            f"({format_bytes(plan.peak)}) at its peak, above the {source} of {budget:,} bytes "
            f"({format_bytes(budget)}).\n{plan.summary()}\n{_remedies(plan, args)}"
        )
    return plan


def _remedies(plan: MemoryPlan, args) -> str:
    """The settings that shrink the plan, for the refusal's message."""
    out = ["Settings that shrink it:"]
    structure = coerce(HessianStructure, args.hessian_structure, "hessian_structure")
    if structure == HessianStructure.KRON:
        out.append(
            f"- factor_rank=k (now {args.factor_rank}): factors wider than 2k + 10 are kept as "
            "k eigenpairs and a sketch (d·(k + 10) numbers instead of d²);"
        )
        out.append("- hessian_structure='diag': one number per parameter instead of the factors;")
    else:
        out.append(
            f"- hessian_structure='kron' (K-FAC, with factor_rank for wide layers) or 'diag' "
            f"(now {structure.value!r});"
        )
    if plan.predictive:
        out.append(
            "- predictive_subset_of_weights='last_layer' (now "
            f"{coerce(SubsetOfWeights, args.predictive_subset_of_weights, 'x').value!r}), a "
            "smaller per_device_eval_batch_size, or eval_laplace=False: the predictive's "
            "Jacobians are batch × outputs × parameters;"
        )
    if plan.validation_cache:
        out.append("- predictive_prior='marglik': no Jacobians of the whole eval_dataset are kept;")
    out.append(
        "- backend ('ggn-mc', 'ggn', 'ef') does not change this memory: every backend "
        "backpropagates one column at a time into the same sums."
    )
    out.append("Or set marglik_memory_budget higher if the device has the room.")
    return "\n".join(out)
