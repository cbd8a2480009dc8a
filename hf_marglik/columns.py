"""Columns ``s`` of a square root of the loss Hessian in the logits, ``Λ = Σ_s s sᵀ``: one
backward pass each gives the curvature (:mod:`hf_marglik.curvature`).

Exact GGN: ``s_c = √p_c (e_c − p)`` for softmax cross-entropy (``C − 1`` columns from an
eigendecomposition up to :data:`MAX_REDUCED_OUTPUTS` classes), ``e_c`` for squared error;
Monte-Carlo GGN: ``s = p − e_ŷ`` with ``ŷ`` sampled from the model (``ε ~ N(0, I)`` for
regression), from uniforms keyed by the example (:mod:`hf_marglik.draws`); empirical Fisher:
the gradient at the observed target. Positions that are not data are zero in every column.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .batches import Targets
from .draws import LabelDraws
from .options import Backend

MAX_EXACT_OUTPUTS = 1024
"""Largest number of outputs (classes) for the exact GGN: one backward pass per output."""
MAX_REDUCED_OUTPUTS = 64
"""Up to here the exact GGN takes ``C − 1`` columns (a ``C × C`` eigh per data point)."""


def check_outputs(n_outputs: int, backend: Backend) -> None:
    if backend == Backend.GGN and n_outputs > MAX_EXACT_OUTPUTS:
        raise ValueError(
            f"backend='ggn' (exact GGN) needs one backward pass per output and the model has "
            f"{n_outputs} outputs (a vocabulary?). Use backend='ggn-mc' (Monte-Carlo GGN, one "
            "backward per sample) or backend='ef'."
        )


def _softmax_hessian_root(p: Tensor) -> list[Tensor]:
    """``C − 1`` columns ``s`` with ``Σ_s s sᵀ = diag(p) − p pᵀ`` (per example), one fewer
    backward pass than the ``C`` columns ``√p_c (e_c − p)``: the Hessian has rank ``C − 1``
    (``1`` is in its kernel), so it is ``U M Uᵀ`` for an orthonormal basis ``U`` of ``1^⊥`` and
    ``M = Uᵀ H U`` (``C − 1`` square), and the columns are ``U V √Λ`` from ``M = V Λ Vᵀ``."""
    C = p.shape[-1]
    q = p.double()
    H = torch.diag_embed(q) - q.unsqueeze(-1) * q.unsqueeze(-2)
    # U: the last C − 1 columns of the Q factor of [1, I] (orthonormal, orthogonal to 1)
    ones = torch.ones(C, 1, dtype=q.dtype, device=q.device)
    U = torch.linalg.qr(torch.cat([ones, torch.eye(C, dtype=q.dtype, device=q.device)], 1))[0]
    U = U[:, 1:]
    lam, V = torch.linalg.eigh(U.T @ H @ U)
    S = (U @ V) * lam.clamp_min(0).sqrt().unsqueeze(-2)  # (..., C, C − 1)
    return [S[..., k].to(p.dtype) for k in range(C - 1)]


SAMPLE_CHUNK = 1 << 22
"""Probabilities per chunk of rows in :func:`sample_categorical` (32 MiB of float64 CDF)."""


def sample_categorical(
    p: Tensor, generator: torch.Generator | None = None, uniforms: Tensor | None = None
) -> Tensor:
    """One class per row of ``p`` (``(n, C)``, rows summing to about 1), drawn by inverting the
    float64 CDF at a uniform draw (``uniforms``, ``n`` values in ``(0, 1)``, or drawn from
    ``generator``): the exact categorical distribution up to float64 rounding,
    and a zero-probability class is never drawn. ``torch.multinomial`` did the same at about 10×
    the cost for a vocabulary (0.47 s for 512 tokens × 49,152 on 2 CPU threads, against 0.04 s:
    BENCHMARKS.md). Rows are taken in chunks of :data:`SAMPLE_CHUNK` probabilities, so the CDF
    never holds more than one chunk."""
    n, C = p.shape
    if uniforms is None:
        u = torch.rand(n, 1, generator=generator, dtype=torch.float64, device=p.device)
    else:
        u = uniforms.to(device=p.device, dtype=torch.float64).reshape(n, 1)
    out = torch.empty(n, 1, dtype=torch.long, device=p.device)
    step = max(1, SAMPLE_CHUNK // max(C, 1))
    for i in range(0, n, step):
        cdf = p[i : i + step].double().cumsum(-1)
        draw = u[i : i + step] * cdf[:, -1:]
        out[i : i + step] = torch.searchsorted(cdf, draw, right=True).clamp_max_(C - 1)
    return out


def loss_columns(
    t: Targets, backend: Backend, n_samples: int = 1, draws: LabelDraws | None = None
) -> Iterator[Tensor]:
    """Columns ``s`` (shaped like ``t.logits``) with ``Σ_s s sᵀ`` = the curvature of the loss in
    the logits at unit noise: exact GGN, Monte-Carlo GGN (its labels drawn from ``draws``:
    :mod:`hf_marglik.draws`) or empirical Fisher."""
    if backend == Backend.GGN_MC and draws is None:
        raise ValueError("backend='ggn-mc' needs the draws of its sampled labels (LabelDraws).")
    f = t.logits.detach()
    m = t.mask.unsqueeze(-1).to(f.dtype)
    categorical = t.y.dtype in (torch.long, torch.int, torch.int32)
    if categorical:
        p = torch.softmax(f, dim=-1)
        if backend == Backend.GGN and 1 < f.shape[-1] <= MAX_REDUCED_OUTPUTS:
            yield from (s * m for s in _softmax_hessian_root(p))
        elif backend == Backend.GGN:
            for c in range(f.shape[-1]):
                s = -p * p[..., c : c + 1].sqrt()
                s[..., c] += p[..., c].sqrt()
                yield s * m
        elif backend == Backend.GGN_MC:
            flat = p.reshape(-1, p.shape[-1])
            weight = m / math.sqrt(n_samples)
            for i in range(n_samples):
                u = draws.uniforms(tuple(p.shape[:-1]), i)
                y = sample_categorical(flat, uniforms=u).reshape(*p.shape[:-1], 1)
                # p − e_ŷ built in place (no one-hot of the vocabulary); the last sample reuses p
                s = p if i == n_samples - 1 else p.clone()
                s.scatter_add_(-1, y, torch.full(y.shape, -1.0, dtype=p.dtype, device=p.device))
                yield s.mul_(weight)
        else:
            yield (p - nn.functional.one_hot(t.y, p.shape[-1]).to(f.dtype)) * m
    else:
        if backend == Backend.GGN:
            for c in range(f.shape[-1]):
                s = torch.zeros_like(f)
                s[..., c] = 1.0
                yield s * m
        elif backend == Backend.GGN_MC:
            for i in range(n_samples):
                eps = torch.special.ndtri(draws.uniforms(tuple(f.shape), i)).to(f.dtype)
                yield eps * m / math.sqrt(n_samples)
        else:
            yield (f - t.y) * m


def per_position(columns: Iterator[Tensor], mask: Tensor) -> Iterator[Tensor]:
    """Split each column of a token-level likelihood into one column per position, so that
    per-example gradients are per target token (exact ``full``/``diag`` for causal LMs)."""
    positions = mask.any(0).nonzero().flatten().tolist()
    for s in columns:
        for t in positions:
            single = torch.zeros_like(s)
            single[:, t] = s[:, t]
            yield single
