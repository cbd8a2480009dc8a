"""The dense GGN / Fisher over all trainable parameters: the exact reference for small models."""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import HessianStructure
from ..prior import Prior, flat_index
from .base import Posterior


class FullPosterior(Posterior):
    """``H`` as a dense symmetric ``(P, P)`` matrix."""

    structure = HessianStructure.FULL

    def __init__(self, sizes: list[int], H: Tensor):
        super().__init__(sizes)
        self.H = H

    def cholesky(self, prior: Prior, f: Tensor) -> Tensor:
        """``L`` with ``L Lᵀ = f·H + P``."""
        return torch.linalg.cholesky(f * self.H + torch.diag(prior.per_parameter()))

    def log_det(self, prior: Prior, f: Tensor) -> Tensor:
        return 2 * torch.log(torch.diagonal(self.cholesky(prior, f))).sum()

    def whiten(self, chunks: list[Tensor], prior: Prior, f: Tensor) -> list[Tensor]:
        J = torch.cat(chunks, dim=1)
        return [torch.linalg.solve_triangular(self.cholesky(prior, f), J.T, upper=False).T]

    def sample(self, n: int, prior: Prior, f: Tensor, generator=None) -> list[Tensor]:
        L = self.cholesky(prior, f)
        z = torch.randn(L.shape[0], n, generator=generator, dtype=L.dtype, device=L.device)
        draws = torch.linalg.solve_triangular(L.T, z, upper=True).T
        return list(torch.split(draws, self.sizes, dim=1))

    def subset(self, indices: list[int]) -> FullPosterior:
        keep = flat_index(self.sizes, indices, self.H.device)
        out = FullPosterior([self.sizes[i] for i in indices], self.H[keep][:, keep])
        out.n_clipped = self.n_clipped
        return out

    def curvature_dense(self) -> Tensor:
        return self.H.clone()

    def state_dict(self) -> dict:
        return {"H": self.H}
