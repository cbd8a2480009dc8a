"""The diagonal of the GGN / Fisher: ``Σ = diag(1 / (f·h + p))``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import HessianStructure
from ..prior import Prior, flat_index
from .base import Posterior


class DiagPosterior(Posterior):
    """``H = diag(h)``, ``h`` one entry per trainable parameter."""

    structure = HessianStructure.DIAG

    def __init__(self, sizes: list[int], h: Tensor):
        super().__init__(sizes)
        self.h = h

    def _precision(self, prior: Prior, f: Tensor) -> Tensor:
        return f * self.h + prior.per_parameter()

    def log_det(self, prior: Prior, f: Tensor) -> Tensor:
        return torch.log(self._precision(prior, f)).sum()

    def whiten(self, chunks: list[Tensor], prior: Prior, f: Tensor) -> list[Tensor]:
        return [torch.cat(chunks, dim=1) * torch.rsqrt(self._precision(prior, f))]

    def sample(self, n: int, prior: Prior, f: Tensor, generator=None) -> list[Tensor]:
        std = torch.rsqrt(self._precision(prior, f))
        z = torch.randn(n, self.n_params, generator=generator, dtype=std.dtype, device=std.device)
        return list(torch.split(z * std, self.sizes, dim=1))

    def subset(self, indices: list[int]) -> DiagPosterior:
        out = DiagPosterior(
            [self.sizes[i] for i in indices], self.h[flat_index(self.sizes, indices, self.h.device)]
        )
        out.n_clipped = self.n_clipped
        return out

    def curvature_dense(self) -> Tensor:
        return torch.diag(self.h)

    def state_dict(self) -> dict:
        return {"H": self.h}
