"""The one public face of a fitted curvature: ``Posterior``.

A posterior holds the curvature ``H`` (the GGN / Fisher of the summed loss at unit noise) in its
structure's own form and answers, for a prior ``P`` (:class:`~hf_marglik.prior.Prior`) and the
likelihood factor ``f = 1 / (σ² T)``, every question the rest of the package asks of
``Σ = (f·H + P)⁻¹``: ``log det(f·H + P)``, products ``J Σ Jᵀ``, draws from ``N(0, Σ)``, the dense
matrices for small models. Nothing outside ``hf_marglik.posterior`` reads a structure's fields.
Flat vectors and Jacobian chunks follow the trainable-parameter order
(:func:`~hf_marglik.prior.trainable_parameters`); a weight's entries are row-major.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..options import HessianStructure
from ..prior import Prior


class Posterior(ABC):
    """The curvature of one fit; ``sizes`` are the numbers of entries of the trainable tensors."""

    structure: HessianStructure

    def __init__(self, sizes: list[int]):
        self.sizes = list(sizes)
        self.n_clipped = 0
        """Negative eigenvalues (rounding) clipped to 0 when the curvature was decomposed."""

    @property
    def n_params(self) -> int:
        return sum(self.sizes)

    @abstractmethod
    def log_det(self, prior: Prior, f: Tensor) -> Tensor:
        """``log det(f·H + P)``, differentiable in the prior's values and ``f``."""

    @abstractmethod
    def whiten(self, chunks: list[Tensor], prior: Prior, f: Tensor) -> list[Tensor]:
        """``R`` with ``R Rᵀ = J Σ Jᵀ`` for rows ``J`` given per tensor as ``(m, numel)`` chunks:
        ``J L⁻ᵀ`` for a factor ``L Lᵀ = f·H + P`` (per block, so ``R`` is a list of blocks whose
        products sum to ``J Σ Jᵀ``)."""

    @abstractmethod
    def sample(self, n: int, prior: Prior, f: Tensor, generator=None) -> list[Tensor]:
        """``n`` draws ``θ − θ*`` from ``N(0, Σ)``: one ``(n, numel)`` tensor per tensor."""

    @abstractmethod
    def curvature_dense(self) -> Tensor:
        """``H`` as a dense ``(P, P)`` matrix (tests and small models)."""

    @abstractmethod
    def subset(self, indices: list[int]) -> Posterior:
        """The curvature of the tensors ``indices`` alone, ``H_SS``: the posterior of a Laplace
        over those tensors with the others fixed at the MAP (laplace-torch's
        ``subset_of_weights``), without a new pass over the data. The blocks are shared, not
        copied."""

    @abstractmethod
    def state_dict(self) -> dict:
        """The curvature in its stored form (loads with :func:`posterior_from_state`)."""

    def quadratic(self, chunks: list[Tensor], prior: Prior, f: Tensor) -> Tensor:
        """``J Σ Jᵀ`` ``(m, m)`` for rows ``J`` given per tensor as ``(m, numel)`` chunks."""
        total = 0
        for R in self.whiten(chunks, prior, f):
            total = total + R @ R.T
        return total

    def output_covariance(self, chunks: list[Tensor], n: int, k: int, prior: Prior, f: Tensor):
        """The ``(n, k, k)`` blocks of ``J Σ Jᵀ`` of ``n`` examples with ``k`` outputs each
        (rows example-major): the GLM predictive's per-example covariance, without the
        ``(nk)²`` cross terms."""
        total = 0
        for R in self.whiten(chunks, prior, f):
            R = R.reshape(n, k, -1)
            total = total + R @ R.transpose(1, 2)
        return total

    def output_covariance_fn(self, chunks: list[Tensor], n: int, k: int, isotropic: bool):
        """``(prior, f) -> output_covariance(chunks, n, k, prior, f)`` for fixed rows, with the
        work that does not depend on the prior done once (a grid of prior precisions, or two
        priors, over one set of Jacobians). ``isotropic``: every prior it will be called with is
        isotropic per tensor (scalar or layerwise), which lets K-FAC keep only rotated rows.
        Structures with nothing to precompute call :meth:`output_covariance` each time."""
        return lambda prior, f: self.output_covariance(chunks, n, k, prior, f)

    def precision_dense(self, prior: Prior, f: Tensor) -> Tensor:
        """``f·H + P`` as a dense matrix (tests and small models)."""
        return f * self.curvature_dense() + torch.diag(prior.per_parameter())

    def covariance_dense(self, prior: Prior, f: Tensor) -> Tensor:
        """``Σ`` as a dense matrix (tests and small models)."""
        H = self.curvature_dense()
        eye = torch.eye(self.n_params, dtype=H.dtype, device=H.device)
        return self.quadratic(list(torch.split(eye, self.sizes, dim=1)), prior, f)
