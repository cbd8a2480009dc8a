"""K-FAC: one Kronecker-factored block ``B ⊗ A`` per trainable weight (``B`` alone for a bias).

Each factor is kept as its eigendecomposition ``Q diag(λ) Qᵀ`` (:class:`EigFactor`); a factor
that several blocks share (the input factor of LoRA ``A`` on ``q_proj`` and ``v_proj``, which
read the same input; the output factor of a head's weight and bias) is stored once and named by
index in ``blocks``. With an isotropic prior ``δ`` on a block,
``Σ = (Q_B ⊗ Q_A) diag(1 / (f·λ_B ⊗ λ_A + δ)) (Q_B ⊗ Q_A)ᵀ``: the log determinant is a sum over
eigenvalue products, a weight sample is the matrix-normal draw ``Q_B (Z ⊙ D) Q_Aᵀ`` with
``D = (f·λ_B λ_Aᵀ + δ)^{-1/2}``, and ``J Σ Jᵀ`` rotates each gradient matrix ``G`` to
``Q_Bᵀ G Q_A`` and weights it by ``D²``. A diagonal prior is not diagonal in that eigenbasis:
each block is then factorised densely (up to :data:`MAX_DENSE_BLOCK` parameters).

A factor may hold only its leading eigenvectors (``vectors`` with fewer columns than ``values``
has entries, after :meth:`KronPosterior.compress` or from a sketched factor,
:mod:`hf_marglik.factors`): the remaining eigenvalues have no stored directions and act as the
isotropic remainder ``mean(values[k:])`` on the orthogonal complement of ``vectors`` in products
and samples, while the log determinant sums over all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..options import HessianStructure, PriorStructure
from ..prior import Prior
from .base import Posterior

MAX_DENSE_BLOCK = 8192
"""Largest K-FAC block (parameters of one tensor) for which a diagonal prior is handled by a
dense Cholesky factorisation."""


@dataclass
class EigFactor:
    """A positive semi-definite factor ``Q diag(λ) Qᵀ`` (``vectors`` may hold only the leading
    eigenvectors; see the module docstring)."""

    values: Tensor
    vectors: Tensor

    @property
    def side(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def compressed(self) -> bool:
        return self.vectors.shape[1] < self.values.numel()

    def dense(self) -> Tensor:
        """The factor as a matrix (a compressed factor's tail as its mean on the complement)."""
        Q = self.vectors
        k = Q.shape[1]
        M = Q @ torch.diag(self.values[:k]) @ Q.T
        if k < self.values.numel():
            eye = torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device)
            M = M + self.values[k:].mean() * (eye - Q @ Q.T)
        return M

    def truncated(self, rank: int) -> EigFactor:
        """The ``rank`` leading eigenpairs, then the mean of the other eigenvalues repeated
        (``eigh`` order is ascending); small or already compressed factors are returned as
        they are."""
        k = self.vectors.shape[1]
        if k <= rank or self.compressed:
            return self
        order = torch.argsort(self.values, descending=True)
        lam, Q = self.values[order], self.vectors[:, order]
        rest = lam[rank:].mean()
        lam = torch.cat([lam[:rank], rest.expand(lam.numel() - rank)])
        return EigFactor(lam, Q[:, :rank].contiguous())


class KronPosterior(Posterior):
    """K-FAC blocks ``factors[b] ⊗ factors[a]`` per tensor, ``blocks[i] = (b, a)`` (``a`` None
    for a bias)."""

    structure = HessianStructure.KRON

    def __init__(
        self, sizes: list[int], factors: list[EigFactor], blocks: list[tuple[int, int | None]]
    ):
        super().__init__(sizes)
        self.factors, self.blocks = list(factors), [tuple(b) for b in blocks]
        eigs = [self.block_eigenvalues(i) for i in range(len(self.blocks))]
        # one flat vector and its block index: the log determinant is then a single fused
        # expression per hyper-step instead of a handful of small ops per block
        self._eig_flat = torch.cat(eigs)
        self._eig_block = torch.repeat_interleave(
            torch.arange(len(eigs), device=self._eig_flat.device),
            torch.tensor([e.numel() for e in eigs], device=self._eig_flat.device),
        )
        self._dense_blocks: list[Tensor] | None = None

    # ------------------------------------------------------------------ inspection
    def block_factors(self, i: int) -> tuple[EigFactor, EigFactor | None]:
        b, a = self.blocks[i]
        return self.factors[b], None if a is None else self.factors[a]

    def block_eigenvalues(self, i: int) -> Tensor:
        """The eigenvalues of tensor ``i``'s block ``B ⊗ A`` (row-major: ``λ_B ⊗ λ_A``)."""
        B, A = self.block_factors(i)
        return B.values if A is None else torch.outer(B.values, A.values).reshape(-1)

    def kron_factors(self) -> list[tuple[Tensor, Tensor | None]]:
        """``(B, A)`` per trainable tensor as dense matrices (``A`` None for a bias)."""
        out = []
        for i in range(len(self.blocks)):
            B, A = self.block_factors(i)
            out.append((B.dense(), None if A is None else A.dense()))
        return out

    def dense_block(self, i: int) -> Tensor:
        B, A = self.block_factors(i)
        return B.dense() if A is None else torch.kron(B.dense(), A.dense())

    def dense_blocks(self) -> list[Tensor]:
        """Every block densely, for a diagonal prior (blocks up to :data:`MAX_DENSE_BLOCK`)."""
        big = [(i, s) for i, s in enumerate(self.sizes) if s > MAX_DENSE_BLOCK]
        if big:
            raise ValueError(
                f"prior_structure='diag' with hessian_structure='kron' factorises each block "
                f"densely, and trainable tensor {big[0][0]} has {big[0][1]} parameters (limit "
                f"{MAX_DENSE_BLOCK}). Use prior_structure='layerwise' or 'scalar' (exact and "
                "cheap with K-FAC), or hessian_structure='diag' with a diagonal prior."
            )
        if self._dense_blocks is None:
            self._dense_blocks = [self.dense_block(i) for i in range(len(self.blocks))]
        return self._dense_blocks

    def curvature_dense(self) -> Tensor:
        return torch.block_diag(*[self.dense_block(i) for i in range(len(self.blocks))])

    # ------------------------------------------------------------------ the posterior
    def log_det(self, prior: Prior, f: Tensor) -> Tensor:
        if prior.structure == PriorStructure.SCALAR:
            return torch.log(f * self._eig_flat + prior.values[0]).sum()
        if prior.isotropic_per_tensor:
            return torch.log(f * self._eig_flat + prior.values[self._eig_block]).sum()
        total = prior.values.new_zeros(())
        for d, block in zip(prior.per_tensor(), self.dense_blocks()):
            L = torch.linalg.cholesky(f * block + torch.diag(d))
            total = total + 2 * torch.log(torch.diagonal(L)).sum()
        return total

    def whiten(self, chunks: list[Tensor], prior: Prior, f: Tensor) -> list[Tensor]:
        if not prior.isotropic_per_tensor:
            return [
                torch.linalg.solve_triangular(L, J.T, upper=False).T
                for L, J in zip(self._block_choleskys(prior, f), chunks)
            ]
        out = []
        for i, (d, J) in enumerate(zip(prior.per_tensor(), chunks)):
            B, A = self.block_factors(i)
            X = J if A is None else J.reshape(J.shape[0], B.side, A.side)
            out.append(_half_kron(B, A, f, d, X).reshape(J.shape[0], -1))
        return out

    def output_covariance_fn(self, chunks: list[Tensor], n: int, k: int, isotropic: bool):
        """With ``isotropic``: the rows rotated once into each block's eigenbasis,
        ``X̃ = Q_Bᵀ X Q_A``; then ``J Σ Jᵀ = Σ_blocks X̃ diag(1 / (f·λ_B ⊗ λ_A + δ)) X̃ᵀ`` for every
        isotropic-per-tensor prior at the cost of a scaling, where :meth:`whiten` rotates (and
        rotates back) per prior. Only the rotated rows are kept (no second copy of the
        Jacobians); a diagonal prior is then refused. Compressed factors, and ``isotropic=False``,
        take :meth:`output_covariance` per call."""
        if not isotropic or any(f.compressed for f in self.factors):
            return super().output_covariance_fn(chunks, n, k, isotropic)
        rotated = []
        for i, J in enumerate(chunks):
            B, A = self.block_factors(i)
            X = (
                J @ B.vectors
                if A is None
                else B.vectors.T @ J.reshape(-1, B.side, A.side) @ A.vectors
            )
            rotated.append(X.reshape(n, k, -1))
        eigs = [self.block_eigenvalues(i) for i in range(len(self.blocks))]

        def covariance(prior: Prior, f: Tensor) -> Tensor:
            if not prior.isotropic_per_tensor:
                raise ValueError(
                    "This output covariance was built for priors isotropic per tensor "
                    "(isotropic=True) and got a diagonal prior; build it with isotropic=False."
                )
            total = 0
            for X, lam, d in zip(rotated, eigs, prior.per_tensor()):
                total = total + (X / (f * lam + d)) @ X.transpose(1, 2)
            return total

        return covariance

    def sample(self, n: int, prior: Prior, f: Tensor, generator=None) -> list[Tensor]:
        dtype, dev = self._eig_flat.dtype, self._eig_flat.device

        def normal(*shape):
            return torch.randn(*shape, generator=generator, dtype=dtype, device=dev)

        if not prior.isotropic_per_tensor:
            out = []
            for L in self._block_choleskys(prior, f):
                z = normal(L.shape[0], n)
                out.append(torch.linalg.solve_triangular(L.T, z, upper=True).T)
            return out
        out = []
        for i, d in enumerate(prior.per_tensor()):
            B, A = self.block_factors(i)
            shape = (n, B.side) if A is None else (n, B.side, A.side)
            out.append(_half_kron(B, A, f, d, normal(*shape)).reshape(n, -1))
        return out

    def _block_choleskys(self, prior: Prior, f: Tensor) -> list[Tensor]:
        return [
            torch.linalg.cholesky(f * blk + torch.diag(d.expand(blk.shape[0])))
            for blk, d in zip(self.dense_blocks(), prior.per_tensor())
        ]

    # ------------------------------------------------------------------ storage
    def compress(self, rank: int) -> KronPosterior:
        """Every factor with more than ``rank`` rows cut to its ``rank`` leading eigenpairs and
        the mean of the rest (an isotropic remainder that preserves the trace); a shared factor
        is cut once and stays shared. Storage per factor drops from ``d²`` to ``d·rank``."""
        out = KronPosterior(self.sizes, [f.truncated(rank) for f in self.factors], self.blocks)
        out.n_clipped = self.n_clipped
        return out

    def subset(self, indices: list[int]) -> KronPosterior:
        """The blocks of the tensors ``indices``; a factor they share stays shared, and the
        factors no kept block names are dropped."""
        used: dict[int, int] = {}
        for i in indices:
            for j in self.blocks[i]:
                if j is not None and j not in used:
                    used[j] = len(used)
        blocks = [
            (used[b], None if a is None else used[a]) for b, a in (self.blocks[i] for i in indices)
        ]
        out = KronPosterior(
            [self.sizes[i] for i in indices], [self.factors[j] for j in used], blocks
        )
        out.n_clipped = self.n_clipped
        return out

    def state_dict(self) -> dict:
        return {
            "factors": [(f.values, f.vectors) for f in self.factors],
            "blocks": [list(b) for b in self.blocks],
        }

    @classmethod
    def from_state(cls, sizes: list[int], sd: dict) -> KronPosterior:
        factors = [EigFactor(v, q) for v, q in sd["factors"]]
        return cls(sizes, factors, [tuple(b) for b in sd["blocks"]])

    @classmethod
    def from_per_tensor(cls, sizes: list[int], per_tensor: list[tuple]) -> KronPosterior:
        """From hf_marglik 0.1's layout: ``(λ_B, Q_B, λ_A, Q_A)`` per tensor, a shared factor
        being the same tensor object in several entries (as ``torch.load`` restores it)."""
        factors: list[EigFactor] = []
        index: dict[int, int] = {}

        def factor(lam: Tensor, Q: Tensor) -> int:
            if id(Q) not in index:
                index[id(Q)] = len(factors)
                factors.append(EigFactor(lam, Q))
            return index[id(Q)]

        blocks = [
            (factor(lb, qb), None if la is None else factor(la, qa))
            for lb, qb, la, qa in per_tensor
        ]
        return cls(sizes, factors, blocks)


def _half_kron(B: EigFactor, A: EigFactor | None, f: Tensor, d: Tensor, X: Tensor) -> Tensor:
    """``Σ^{1/2} X`` for one K-FAC block with an isotropic prior ``d``; ``X`` is ``(m, d_out)``
    for a bias or ``(m, d_out, d_in)`` for a weight. A compressed factor's complement is an
    eigenspace with the mean of its tail as eigenvalue and is handled by projection."""
    lb, qb = B.values, B.vectors
    kb = qb.shape[1]
    rb = lb[kb:].mean() if kb < lb.numel() else None
    if A is None:
        c = X @ qb
        out = (c * torch.rsqrt(f * lb[:kb] + d)) @ qb.T
        if kb < lb.numel():
            out = out + torch.rsqrt(f * rb + d) * (X - c @ qb.T)
        return out
    la, qa = A.values, A.vectors
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
