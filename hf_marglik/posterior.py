"""The posterior covariance ``Σ = (f·H + P)⁻¹`` of a fitted :class:`~hf_marglik.Laplace`, applied
without forming it where the structure allows.

For a K-FAC block ``B ⊗ A = (Q_B ⊗ Q_A) diag(λ_B ⊗ λ_A) (Q_B ⊗ Q_A)ᵀ`` with an isotropic prior
``δ``, ``Σ = (Q_B ⊗ Q_A) diag(1 / (f·λ_B ⊗ λ_A + δ)) (Q_B ⊗ Q_A)ᵀ``. A weight sample is then the
matrix-normal draw ``Q_B (Z ⊙ D) Q_Aᵀ`` with ``D = (f·λ_B λ_Aᵀ + δ)^{-1/2}`` and ``Z`` standard
normal; a quadratic form ``J Σ Jᵀ`` rotates each gradient matrix ``G`` to ``Q_Bᵀ G Q_A`` and
weights it by ``D²``. Diagonal priors on K-FAC blocks, and the ``full`` structure, use a dense
Cholesky factor of the precision.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .options import HessianStructure


def _prior_chunks(lap) -> list[Tensor]:
    """The prior precision of each trainable tensor: a 1-element tensor (isotropic) or a vector."""
    prec, sizes = lap.prior_precision, lap._sizes
    if prec.numel() == 1:
        return [prec] * len(sizes)
    if prec.numel() == len(sizes):
        return [prec[i : i + 1] for i in range(len(sizes))]
    return list(torch.split(prec, sizes))


def _f(lap) -> Tensor:
    return lap._H_factor(lap.sigma_noise)


def _dense_precision_cholesky(lap) -> list[Tensor]:
    """Cholesky factors of the dense precision: one per K-FAC block, or one for ``full``."""
    f = _f(lap)
    if lap.hessian_structure == HessianStructure.FULL:
        from .params import per_parameter

        P = torch.diag(per_parameter(lap.prior_precision, lap._sizes))
        return [torch.linalg.cholesky(f * lap._H + P)]
    return [
        torch.linalg.cholesky(f * blk + torch.diag(d.expand(blk.shape[0])))
        for blk, d in zip(lap._dense_kron_blocks(), _prior_chunks(lap))
    ]


def _isotropic_kron(lap) -> bool:
    return lap.hessian_structure == HessianStructure.KRON and lap.prior_precision.numel() <= len(
        lap._sizes
    )


def _half_kron(lb, qb, la, qa, f, d, X: Tensor) -> Tensor:
    """``Σ^{1/2} X`` for one K-FAC block with an isotropic prior ``d``; ``X`` is ``(m, d_out)``
    for a bias or ``(m, d_out, d_in)`` for a weight.

    A factor may hold only its leading eigenvectors (``q`` with fewer columns than ``l`` has
    entries): the remaining eigenvalues ``l[k:]`` have no stored directions and act as the
    isotropic remainder ``mean(l[k:])`` (equal to them after :meth:`Laplace.compress`; for a
    sketched factor the rotation average of its tail, see :mod:`hf_marglik.factors`), so the
    orthogonal complement of ``q`` is an eigenspace and is handled by projection.
    """
    kb = qb.shape[1]
    rb = lb[kb:].mean() if kb < lb.numel() else None
    if la is None:
        c = X @ qb
        out = (c * torch.rsqrt(f * lb[:kb] + d)) @ qb.T
        if kb < lb.numel():
            out = out + torch.rsqrt(f * rb + d) * (X - c @ qb.T)
        return out
    ka = qa.shape[1]
    ra = la[ka:].mean() if ka < la.numel() else None
    Xa = X @ qa  # (m, d_out, ka)
    top = qb.T @ Xa  # (m, kb, ka)
    out = qb @ (top * torch.rsqrt(f * torch.outer(lb[:kb], la[:ka]) + d)) @ qa.T
    rem_a, rem_b = ka < la.numel(), kb < lb.numel()
    if rem_a:
        Xr = X - Xa @ qa.T
        out = out + qb @ ((qb.T @ Xr) * torch.rsqrt(f * lb[:kb] * ra + d)[:, None])
    if rem_b:
        out = out + ((Xa - qb @ top) * torch.rsqrt(f * rb * la[:ka] + d)) @ qa.T
    if rem_a and rem_b:
        out = out + torch.rsqrt(f * rb * ra + d) * (Xr - qb @ (qb.T @ Xr))
    return out


def samples(lap, n: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """``n`` draws ``θ − θ*`` from the posterior: one ``(n, numel)`` tensor per trainable
    tensor (each factorisation is computed once for all draws)."""
    lap._check_fitted()
    dtype, dev = lap.dtype, lap.device

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype, device=dev)

    f = _f(lap)
    if _isotropic_kron(lap):
        out = []
        for (lb, qb, la, qa), d in zip(lap._kron, _prior_chunks(lap)):
            shape = (n, lb.numel()) if la is None else (n, lb.numel(), la.numel())
            out.append(_half_kron(lb, qb, la, qa, f, d, normal(*shape)).reshape(n, -1))
        return out
    if lap.hessian_structure == HessianStructure.DIAG:
        from .params import per_parameter

        std = torch.rsqrt(f * lap._H + per_parameter(lap.prior_precision, lap._sizes))
        return list(torch.split(normal(n, lap.n_params) * std, lap._sizes, dim=1))
    out = []
    for L in _dense_precision_cholesky(lap):
        z = normal(L.shape[0], n)
        out.append(torch.linalg.solve_triangular(L.T, z, upper=True).T)
    return out if len(out) == len(lap._sizes) else list(torch.split(out[0], lap._sizes, dim=1))


def sample(lap, generator: torch.Generator | None = None) -> list[Tensor]:
    """One draw ``θ − θ*`` from the posterior, as flat vectors per trainable tensor."""
    return [t[0] for t in samples(lap, 1, generator)]


def quadratic(lap, chunks: list[Tensor]) -> Tensor:
    """``J Σ Jᵀ`` for Jacobian rows ``J`` given per trainable tensor as ``(m, numel)`` chunks."""
    lap._check_fitted()
    f = _f(lap)
    if _isotropic_kron(lap):
        total = 0
        for (lb, qb, la, qa), d, J in zip(lap._kron, _prior_chunks(lap), chunks):
            X = J if la is None else J.reshape(J.shape[0], lb.numel(), la.numel())
            R = _half_kron(lb, qb, la, qa, f, d, X).reshape(J.shape[0], -1)
            total = total + R @ R.T
        return total
    if lap.hessian_structure == HessianStructure.DIAG:
        from .params import per_parameter

        J = torch.cat(chunks, dim=1)
        return (J / (f * lap._H + per_parameter(lap.prior_precision, lap._sizes))) @ J.T
    Ls = _dense_precision_cholesky(lap)
    blocks = chunks if len(Ls) == len(chunks) else [torch.cat(chunks, dim=1)]
    total = 0
    for L, J in zip(Ls, blocks):
        V = torch.linalg.solve_triangular(L, J.T, upper=False)
        total = total + V.T @ V
    return total


def covariance_dense(lap) -> Tensor:
    """The dense posterior covariance: for tests and tiny models."""
    eye = torch.eye(lap.n_params, dtype=lap.dtype, device=lap.device)
    return quadratic(lap, list(torch.split(eye, lap._sizes, dim=1)))
