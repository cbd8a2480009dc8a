"""Running sums ``M = Σ XᵀX`` of K-FAC factors, dense or as a memory-bounded sketch.

A dense factor of side ``d`` costs ``d²`` numbers (64 MiB in float32 for ``d = 4096``: about
8.6 GB for LoRA on q and v of a 32-layer, 4096-wide model). A *sketched* factor keeps only
``Y = M Ω`` for a fixed random ``Ω`` with orthonormal columns (``d × (k + p)``, ``k`` the rank
kept, ``p`` oversampling) and ``tr M``; ``Y`` and the trace are linear in the data, so batches,
and processes, simply add. At the end the Nyström approximation ``M ≈ Y (ΩᵀY)⁻¹ Yᵀ`` gives the
leading ``k`` eigenpairs (the numerically stable form of Tropp, Yurtsever, Udell & Cevher,
"Fixed-rank approximation of a positive-semidefinite matrix from streaming data", NeurIPS 2017,
Alg. 3).

The other ``d − k`` eigenvalues (the *tail*) are described by two moments: ``tr M`` (kept
exactly) and ``tr M²``, estimated without bias from the same sketch as ``(d/s)·‖Y‖_F²``
(``Ω`` is Haar-distributed with ``s = k + p`` columns, so ``E[ΩΩᵀ] = (s/d)·I``). The tail is a
*plateau*: ``m = S₁/c`` eigenvalues equal to ``c = S₂/S₁`` and zeros after (the last one
fractional), ``S₁, S₂`` the tail's sum and sum of squares; ``c`` is kept between the tail's mean
(isotropic, when the estimate says the tail is flat) and the smallest kept eigenvalue. Where the
tail would need eigenvalues above the kept ones (``S₂ > S₁·λ_k``: single-pass Nyström
underestimates the leading eigenvalues of a flat spectrum), the leading eigenvalues are scaled
by ``α ≥ 1`` and the plateau sits at ``α·λ_k``, ``α`` and ``m`` solving both moments.

Uses. The tail's eigenvectors are not known, so the tail's eigenvalues are a multiset with no
directions: the marginal likelihood sums ``log(f·λ_B λ_A + δ)`` over the full list (``log det``
is the same for every rotation of the tail, so this is exact for every matrix the description
allows), while covariance products (samples, GLM predictive, ``kron_factors``) use the tail as
the isotropic matrix ``mean(tail)·(I − QQᵀ)``: the average of those matrices over rotations,
with the same trace. The isotropic remainder of earlier versions overstated ``log det``
(Jensen: the tail's mass spread over all ``d − k`` directions); see BENCHMARKS.md
("7B-shaped memory: reading and error analysis").
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

OVERSAMPLE = 10


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DenseFactor:
    """``M = Σ XᵀX`` kept densely."""

    def __init__(self, d: int, dtype: torch.dtype, device: torch.device):
        self.M = torch.zeros(d, d, dtype=dtype, device=device)
        self.count = 0  # rows added (input factors are averaged over them)

    def add(self, X: Tensor) -> None:
        self.M.addmm_(X.T, X)

    def state_dict(self) -> dict:
        return {"M": self.M.clone(), "count": self.count}

    def load_state_dict(self, sd: dict) -> None:
        self.M.copy_(sd["M"])
        self.count = sd["count"]

    def all_reduce(self) -> None:
        if _distributed():
            dist.all_reduce(self.M)

    def eig(self, scale: float) -> tuple[Tensor, Tensor, int]:
        """Eigenvalues (ascending, negatives from rounding clipped to 0), eigenvectors and the
        number clipped, of ``scale · M``. A matrix with NaN or Inf is not decomposed (``eigh``
        raises on some platforms and returns NaN on others): its eigenvalues are NaN."""
        M = self.M * scale
        if not bool(torch.isfinite(M).all()):
            return _not_finite(M.shape[0], M.shape[0], M)
        lam, Q = torch.linalg.eigh(0.5 * (M + M.T))
        return lam.clamp_min(0.0), Q, int((lam < 0).sum())


class SketchedFactor:
    """``M = Σ XᵀX`` kept as ``Y = MΩ`` and ``tr M`` (memory ``d·(rank + OVERSAMPLE)``)."""

    def __init__(self, d: int, rank: int, seed: int, dtype: torch.dtype, device: torch.device):
        self.d, self.rank = d, rank
        g = torch.Generator().manual_seed(seed)
        omega = torch.randn(d, rank + OVERSAMPLE, generator=g, dtype=torch.float64)
        self.omega = torch.linalg.qr(omega).Q.to(dtype=dtype, device=device)
        self.Y = torch.zeros_like(self.omega)
        self.trace = torch.zeros((), dtype=dtype, device=device)
        self.count = 0  # rows added (input factors are averaged over them)

    def add(self, X: Tensor) -> None:
        self.Y.addmm_(X.T, X @ self.omega)
        self.trace += (X * X).sum()

    def state_dict(self) -> dict:  # Ω is regenerated from the seed
        return {"Y": self.Y.clone(), "trace": self.trace.clone(), "count": self.count}

    def load_state_dict(self, sd: dict) -> None:
        self.Y.copy_(sd["Y"])
        self.trace.copy_(sd["trace"])
        self.count = sd["count"]

    def all_reduce(self) -> None:
        if _distributed():
            dist.all_reduce(self.Y)
            dist.all_reduce(self.trace)

    def eig(self, scale: float) -> tuple[Tensor, Tensor, int]:
        """``λ`` of length ``d``: the ``rank`` leading eigenvalues of ``scale · M`` (descending)
        then the tail's eigenvalues (:func:`plateau_tail`, descending); ``Q``: the ``rank``
        leading eigenvectors (NaN eigenvalues for a sketch with NaN or Inf)."""
        if not (bool(torch.isfinite(self.Y).all()) and bool(torch.isfinite(self.trace))):
            return _not_finite(self.d, self.rank, self.Y)
        Y, omega = self.Y.double() * scale, self.omega.double()
        nu = torch.finfo(torch.float64).eps * max(float(torch.linalg.norm(Y)), 1e-300)
        for _ in range(40):  # a factor of rank below rank + OVERSAMPLE needs a larger shift
            Y_nu = Y + nu * omega
            C, info = torch.linalg.cholesky_ex(0.5 * (omega.T @ Y_nu + Y_nu.T @ omega))
            if int(info) == 0:
                break
            nu *= 10.0
        else:
            raise torch.linalg.LinAlgError("sketched factor: no shift makes Ωᵀ(Y + νΩ) definite")
        Bm = torch.linalg.solve_triangular(C, Y_nu.T, upper=False).T
        U, S, _ = torch.linalg.svd(Bm, full_matrices=False)
        lam = (S**2 - nu).clamp_min(0.0)[: self.rank]
        Q = U[:, : self.rank]
        trace = float(self.trace.double()) * scale
        # tr M² without bias: Ω is Haar with s orthonormal columns, E[ΩΩᵀ] = (s/d)·I
        trace_sq = self.d / omega.shape[1] * float((Y * Y).sum())
        top, tail = plateau_tail(lam, self.d, trace, trace_sq)
        full = torch.cat([top, tail])
        return full.to(self.Y.dtype), Q.to(self.Y.dtype).contiguous(), 0


def _not_finite(d: int, k: int, like: Tensor) -> tuple[Tensor, Tensor, int]:
    """NaN eigenvalues and placeholder eigenvectors for a factor that holds NaN or Inf: the
    marginal likelihood is then NaN and the fit is rejected (:func:`hf_marglik.loop.checked_fit`)."""
    lam = torch.full((d,), float("nan"), dtype=like.dtype, device=like.device)
    return lam, torch.eye(d, k, dtype=like.dtype, device=like.device), 0


def plateau_tail(lam: Tensor, d: int, trace: float, trace_sq: float) -> tuple[Tensor, Tensor]:
    """The leading eigenvalues ``lam`` (descending; scaled by ``α ≥ 1`` when needed) and the
    ``d − k`` tail eigenvalues of a PSD matrix with ``tr = trace`` (kept exactly) and
    ``tr² = trace_sq`` (matched where the constraints allow): see the module docstring."""
    k, n = lam.numel(), d - lam.numel()
    zeros = lam.new_zeros(n)
    if n == 0:
        return lam, zeros
    s1, s2 = float(lam.sum()), float((lam * lam).sum())
    low = float(lam[-1]) if k else math.inf  # the tail cannot exceed the kept eigenvalues
    S1 = max(trace - s1, 0.0)
    if S1 <= 1e-12 * max(trace, 1e-300) or low <= 0.0:
        # (numerically) nothing left, or the sketch saw a rank-deficient M: isotropic remainder
        return lam, zeros + min(S1 / n, low)
    S2 = trace_sq - s2
    alpha, c = 1.0, min(max(S2 / S1, S1 / n), low)
    if S2 > S1 * low and k:
        # a plateau at λ_k cannot carry the tail's second moment: scale the leading eigenvalues
        # by α and put the plateau at α·λ_k, m long, so that α·s1 + m·α·λ_k = tr and
        # α²·s2 + m·α²·λ_k² = tr²  (a quadratic in m)
        r = trace_sq / trace**2
        qa, qb, qc = r * low * low, 2 * r * s1 * low - low * low, r * s1 * s1 - s2
        disc = qb * qb - 4 * qa * qc
        m = (-qb + math.sqrt(disc)) / (2 * qa) if disc >= 0 else 0.0
        m = min(max(m, 0.0), S1 / low, float(n))  # α ≥ 1: the sketch only underestimates
        alpha = trace / (s1 + m * low)
        c = alpha * low
        S1 = trace - alpha * s1
    m = min(S1 / c, float(n))
    whole = int(m)
    tail = zeros.clone()
    tail[:whole] = c
    if whole < n:
        tail[whole] = S1 - whole * c  # the fractional last one: the sum is kept exactly
    return lam * alpha, tail


def new_factor(d: int, rank: int | None, seed: int, dtype, device) -> DenseFactor | SketchedFactor:
    """A sketched factor when ``rank`` is set and the side exceeds ``2·rank + OVERSAMPLE``
    (below that the sketch saves nothing), else a dense one."""
    if rank is not None and d > 2 * rank + OVERSAMPLE:
        return SketchedFactor(d, rank, seed, dtype, device)
    return DenseFactor(d, dtype, device)
