"""Running sums ``M = Σ XᵀX`` of K-FAC factors, dense or as a memory-bounded sketch.

A dense factor of side ``d`` costs ``d²`` numbers (64 MiB in float32 for ``d = 4096``: about
8.6 GB for LoRA on q and v of a 32-layer, 4096-wide model). A *sketched* factor keeps only
``Y = M Ω`` for a fixed random ``Ω`` with orthonormal columns (``d × (k + p)``, ``k`` the rank
kept, ``p`` oversampling) and ``tr M``; ``Y`` and the trace are linear in the data, so batches,
and processes, simply add. At the end the Nyström approximation ``M ≈ Y (ΩᵀY)⁻¹ Yᵀ`` gives the
leading ``k`` eigenpairs (the numerically stable form of Tropp, Yurtsever, Udell & Cevher,
"Fixed-rank approximation of a positive-semidefinite matrix from streaming data", NeurIPS 2017,
Alg. 3), and the remaining ``d − k`` eigenvalues are replaced by their mean
``(tr M − Σ λ_top) / (d − k)``: an isotropic remainder that preserves the trace, as
:meth:`hf_marglik.Laplace.compress` does for dense factors.
"""

from __future__ import annotations

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

    def all_reduce(self) -> None:
        if _distributed():
            dist.all_reduce(self.M)

    def eig(self, scale: float) -> tuple[Tensor, Tensor, int]:
        """Eigenvalues (ascending, negatives from rounding clipped to 0), eigenvectors and the
        number clipped, of ``scale · M``."""
        M = self.M * scale
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

    def all_reduce(self) -> None:
        if _distributed():
            dist.all_reduce(self.Y)
            dist.all_reduce(self.trace)

    def eig(self, scale: float) -> tuple[Tensor, Tensor, int]:
        """``λ`` of length ``d``: the ``rank`` leading eigenvalues of ``scale · M`` (descending)
        then the isotropic remainder repeated; ``Q``: the ``rank`` leading eigenvectors."""
        Y, omega = self.Y.double() * scale, self.omega.double()
        nu = torch.finfo(torch.float64).eps * max(float(torch.linalg.norm(Y)), 1e-300)
        Y_nu = Y + nu * omega
        C = torch.linalg.cholesky(0.5 * (omega.T @ Y_nu + Y_nu.T @ omega))
        Bm = torch.linalg.solve_triangular(C, Y_nu.T, upper=False).T
        U, S, _ = torch.linalg.svd(Bm, full_matrices=False)
        lam = (S**2 - nu).clamp_min(0.0)[: self.rank]
        Q = U[:, : self.rank]
        rest = ((self.trace.double() * scale - lam.sum()) / (self.d - self.rank)).clamp_min(0.0)
        # the remainder cannot exceed the smallest kept eigenvalue of a PSD matrix
        rest = torch.minimum(rest, lam[-1]) if lam.numel() else rest
        full = torch.cat([lam, rest.expand(self.d - self.rank)])
        return full.to(self.Y.dtype), Q.to(self.Y.dtype).contiguous(), 0


def new_factor(d: int, rank: int | None, seed: int, dtype, device) -> DenseFactor | SketchedFactor:
    """A sketched factor when ``rank`` is set and the side exceeds ``2·rank + OVERSAMPLE``
    (below that the sketch saves nothing), else a dense one."""
    if rank is not None and d > 2 * rank + OVERSAMPLE:
        return SketchedFactor(d, rank, seed, dtype, device)
    return DenseFactor(d, dtype, device)
