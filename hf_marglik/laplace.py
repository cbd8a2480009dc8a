"""The Laplace approximation over the trainable parameters, and its log marginal likelihood.

With ``H`` the GGN/Fisher of the summed negative log likelihood at unit noise, ``P`` the prior
precision (a zero-mean Gaussian prior), ``f = 1 / (σ² T)`` (σ the observation noise, regression
only; T the temperature) and ``θ*`` the trainable parameters at the MAP (Immer et al., ICML 2021;
laplace-torch's conventions)::

    log p(D) ≈ −f·L(θ*) − c − ½ (log det(f·H + P) − log det P + θ*ᵀ P θ*)

where ``L`` is the summed loss (cross-entropy, or ``½‖f − y‖²`` for regression) and
``c = N·K·log(σ√(2π))`` for regression (0 otherwise). For K-FAC blocks ``B ⊗ A`` with an
isotropic prior ``δ`` per block, ``log det(f·B⊗A + δI) = Σ_ij log(f·λ_i(B)·λ_j(A) + δ)``: the
factors are eigendecomposed once per :meth:`Laplace.fit`, so the marginal likelihood and its
gradients in ``(P, σ)`` are cheap to evaluate many times.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import batches as B
from .curvature import Curvature, Recorder, check_outputs, linear_sites, loss_columns, per_position
from .options import Backend, HessianStructure, KFACApprox, Likelihood, PriorStructure, coerce
from .params import (
    infer_prior_structure,
    per_parameter,
    prior_quadratic,
    prior_size,
    trainable_parameters,
)

MAX_DENSE_BLOCK = 8192
"""Largest K-FAC block (parameters of one tensor) for which a diagonal prior is handled by a
dense Cholesky factorisation."""


def _point_weights(w, t: B.Targets, dtype: torch.dtype) -> Tensor:
    """Per-example weights broadcast to the data points of ``t`` (positions, for a causal LM)."""
    w = torch.as_tensor(w, device=t.logits.device).to(dtype).reshape(-1)
    if w.numel() != t.mask.shape[0]:
        raise ValueError(
            f"example_weights returned {w.numel()} weights for a batch of {t.mask.shape[0]} "
            "examples; return one weight per example."
        )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("example_weights must be finite and non-negative.")
    return w.reshape(-1, *([1] * (t.mask.ndim - 1))).expand(t.mask.shape)


def _max_over_processes(n: int | None, device: torch.device) -> int | None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    t = torch.tensor([-1 if n is None else n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return None if int(t) < 0 else int(t)


def default_kfac_approx(likelihood: Likelihood) -> KFACApprox:
    """``expand`` for every likelihood, as measured (BENCHMARKS.md, "K-FAC fidelity": relative
    error of ``log det(I + H/δ)`` against the exact GGN on small LoRA models).

    Classification: expand was closer than reduce in every seed and prior tried (0.10–0.26 vs
    0.13–0.27; a small margin). Causal LM: expand is the exact choice for per-token losses
    (Eschenhagen et al., 2023) and was closer on GPT-2 (0.14–0.33 vs 0.49–0.66), while reduce was
    closer on the tiny LLaMA (0.07–0.10 vs 0.22–0.42): the tiny models do not settle it, and the
    theory decides until a measurement on a real model does.
    """
    return KFACApprox.EXPAND


def _truncate(lam: Tensor, Q: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Leading ``rank`` eigenpairs first, then the mean of the rest repeated (``eigh`` order is
    ascending)."""
    k = Q.shape[1]
    if k <= rank or k < lam.numel():  # small, or already compressed
        return lam, Q
    order = torch.argsort(lam, descending=True)
    lam, Q = lam[order], Q[:, order]
    rest = lam[rank:].mean()
    return torch.cat([lam[:rank], rest.expand(lam.numel() - rank)]), Q[:, :rank].contiguous()


def _factor_dense(lam: Tensor, Q: Tensor) -> Tensor:
    """The dense factor from its (possibly compressed) eigendecomposition: eigenvalues without
    stored eigenvectors act as their mean on the complement of ``Q`` (see ``_half_kron``)."""
    k = Q.shape[1]
    M = Q @ torch.diag(lam[:k]) @ Q.T
    if k < lam.numel():
        M = M + lam[k:].mean() * (torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device) - Q @ Q.T)
    return M


class Laplace:
    """A Gaussian posterior ``N(θ*, (f·H + P)⁻¹)`` over the parameters with ``requires_grad=True``.

    Args:
        model: the network; frozen parameters are never touched or copied.
        likelihood: ``"classification"``, ``"regression"`` or ``"causal_lm"``.
        hessian_structure: ``"kron"`` (K-FAC, default), ``"diag"`` or ``"full"``.
        prior_precision: a float, or a tensor of length 1 (scalar), one per trainable tensor
            (layerwise) or one per trainable parameter (diag).
        prior_structure: lay a float ``prior_precision`` out as ``"scalar"``, ``"layerwise"`` or
            ``"diag"``; by default inferred from its length.
        sigma_noise: observation noise (regression only).
        temperature: the likelihood is divided by it (``f = 1 / (σ² T)``).
        backend: ``"ggn"`` (exact GGN), ``"ggn-mc"`` (Monte-Carlo GGN) or ``"ef"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` for layers applied at every position; by default
            expand, the measured better choice (:func:`default_kfac_approx`).
        dict_key_x, dict_key_y: keys of the model input and the targets in dict batches.
        n_mc_samples: samples per example for ``"ggn-mc"``.
        enable_backprop: laplace-torch's flag to make the marginal likelihood differentiable in
            the model parameters. Accepted for signature compatibility; ``True`` is refused
            (hf_marglik's curvature is detached from the parameters).
        seed: seed of the Monte-Carlo targets (a fit is then reproducible).
        factor_rank: memory-bounded K-FAC: a factor wider than ``2·factor_rank + 10`` is
            accumulated as a streaming Nyström sketch and kept as its ``factor_rank`` leading
            eigenpairs plus a two-moment tail (:mod:`hf_marglik.factors`); memory per
            factor ``d·(factor_rank + 10)`` instead of ``d²``. None (default): dense factors.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        hessian_structure: HessianStructure | str = HessianStructure.KRON,
        prior_precision: float | Tensor = 1.0,
        prior_structure: PriorStructure | str | None = None,
        sigma_noise: float | Tensor = 1.0,
        temperature: float = 1.0,
        backend: Backend | str = Backend.GGN,
        kfac_approx: KFACApprox | str | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        n_mc_samples: int = 1,
        enable_backprop: bool = False,
        seed: int | None = None,
        factor_rank: int | None = None,
    ):
        self.model = model
        self.likelihood = coerce(Likelihood, likelihood, "likelihood")
        self.hessian_structure = coerce(HessianStructure, hessian_structure, "hessian_structure")
        self.backend = coerce(Backend, backend, "backend")
        self.kfac_approx = (
            default_kfac_approx(self.likelihood)
            if kfac_approx is None
            else coerce(KFACApprox, kfac_approx, "kfac_approx")
        )
        if enable_backprop:
            raise NotImplementedError(
                "enable_backprop=True (a marginal likelihood differentiable in the model "
                "parameters) is not supported: hf_marglik's curvature is detached. Leave it False."
            )
        if factor_rank is not None and factor_rank < 1:
            raise ValueError(f"factor_rank={factor_rank} must be a positive integer or None.")
        self.factor_rank = factor_rank
        if n_mc_samples < 1:
            raise ValueError(f"n_mc_samples={n_mc_samples} must be at least 1.")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be positive.")
        self.dict_key_x, self.dict_key_y = dict_key_x, dict_key_y
        self.n_mc_samples, self.enable_backprop, self.seed = n_mc_samples, enable_backprop, seed
        self.temperature = float(temperature)
        named = trainable_parameters(model)
        self.param_names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._sizes = [p.numel() for p in self._params]
        self._sites = linear_sites(model, named)
        self.dtype = torch.float64 if self._params[0].dtype == torch.float64 else torch.float32
        self.device = self._params[0].device
        if prior_structure is not None:
            structure = coerce(PriorStructure, prior_structure, "prior_structure")
            prec = torch.as_tensor(prior_precision, dtype=self.dtype).reshape(-1)
            if prec.numel() == 1:
                prec = prec.expand(prior_size(structure, self._sizes)).clone()
        else:
            prec = torch.as_tensor(prior_precision, dtype=self.dtype).reshape(-1)
        self.prior_precision = prec
        self.sigma_noise = sigma_noise
        self.n_data: int | None = None
        self.n_outputs: int | None = None
        self.loss: Tensor | None = None
        self.n_clipped = 0

    # ----------------------------------------------------------------- hyperparameters
    @property
    def n_params(self) -> int:
        return sum(self._sizes)

    @property
    def n_layers(self) -> int:
        return len(self._sizes)

    @property
    def prior_structure(self) -> PriorStructure:
        return infer_prior_structure(self._prior_precision.numel(), self._sizes)

    @property
    def prior_precision(self) -> Tensor:
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        self._prior_precision = self._check_precision(value)

    def _check_precision(self, value) -> Tensor:
        prec = torch.as_tensor(value, dtype=self.dtype, device=self.device).reshape(-1)
        infer_prior_structure(prec.numel(), self._sizes)
        if not torch.isfinite(prec).all() or not (prec > 0).all():
            raise ValueError(f"prior_precision must be positive and finite; got {value}.")
        return prec

    @property
    def sigma_noise(self) -> Tensor:
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        self._sigma_noise = self._check_sigma(value)

    def _check_sigma(self, value) -> Tensor:
        sigma = torch.as_tensor(value, dtype=self.dtype, device=self.device).reshape(())
        if not torch.isfinite(sigma) or not sigma > 0:
            raise ValueError(f"sigma_noise must be positive and finite; got {value}.")
        if self.likelihood != Likelihood.REGRESSION and float(sigma) != 1.0:
            raise ValueError(
                f"sigma_noise={float(sigma)} only applies to likelihood='regression'; leave it at "
                "1.0 for categorical likelihoods."
            )
        return sigma

    def _H_factor(self, sigma: Tensor) -> Tensor:
        return 1.0 / (sigma * sigma * self.temperature)

    @property
    def mean(self) -> Tensor:
        """The trainable parameters at the time of the fit, as one flat detached vector."""
        if not hasattr(self, "_mean"):
            return torch.cat([p.detach().reshape(-1) for p in self._params]).to(self.dtype)
        return self._mean

    # ----------------------------------------------------------------- fitting
    def fit(
        self,
        train_loader,
        n_data: int | None = None,
        progress_bar: bool = False,
        example_weights=None,
    ) -> Laplace:
        """Compute the curvature and the loss at the current parameters in one pass.

        ``n_data``: the number of data points of the whole training set when ``train_loader``
        covers a subset; the curvature and the loss are rescaled by ``n_data / counted``.
        ``example_weights``: a callable that takes a batch as the loader yields it and returns
        one weight per example (a 1-d tensor); example ``n``'s likelihood and curvature then
        count ``w_n`` times (an integer weight equals repeating the example), and ``counted``
        is the weighted count. For importance-sampled subsets (:mod:`hf_marglik.subset`).
        The model's train/eval mode, ``requires_grad`` flags and ``.grad`` are restored
        afterwards, also when the pass raises.
        """
        model = self.model
        was_training = model.training
        flags = [p.requires_grad for p in model.parameters()]
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(self.seed)
        curv = Curvature(
            self._sites,
            self._sizes,
            self.hessian_structure,
            self.kfac_approx,
            self.dtype,
            self.device,
            self.factor_rank,
        )
        loss = torch.zeros((), dtype=self.dtype, device=self.device)
        counted, n_outputs = 0.0, None
        model.eval()
        try:
            rec = Recorder(self._sites, self.dtype)
            with rec.recording(model):
                for batch in tqdm(train_loader, desc="Curvature fit", disable=not progress_bar):
                    w = None if example_weights is None else example_weights(batch)
                    n, k = self._fit_batch(rec, curv, batch, generator, loss, w)
                    counted, n_outputs = counted + n, k
        finally:
            model.train(was_training)
            for p, flag, g in zip(model.parameters(), flags, grads):
                p.requires_grad_(flag)
                p.grad = g
        counted = self._all_reduce(curv, loss, counted)
        n_outputs = _max_over_processes(n_outputs, self.device)  # a process may have no batch
        if counted == 0:
            raise ValueError("The data has no data points (all targets are -100 or empty).")
        scale = 1.0 if n_data is None else n_data / counted
        self.n_data = round(counted) if n_data is None else int(n_data)
        self.n_outputs = n_outputs
        self.loss = loss * scale
        self._mean = torch.cat([p.detach().reshape(-1) for p in self._params]).to(self.dtype)
        self._decompose(curv, scale)
        return self

    @staticmethod
    def _all_reduce(curv: Curvature, loss: Tensor, counted: float) -> float:
        """Sum curvature, loss and data count over data-parallel processes (no-op otherwise)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return counted
        curv.all_reduce()
        dist.all_reduce(loss)
        n = torch.tensor(float(counted), dtype=torch.float64, device=loss.device)
        dist.all_reduce(n)
        return float(n.item())

    def _fit_batch(
        self, rec: Recorder, curv: Curvature, batch, generator, loss: Tensor, w: Tensor | None
    ) -> tuple[float, int]:
        inputs, y = B.split_batch(batch, self.dict_key_x, self.dict_key_y)
        inputs, y = B.to_device(inputs, self.device), B.to_device(y, self.device)
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        with torch.enable_grad():
            logits = B.call_model(self.model, inputs, self.dict_key_x)
            t = B.targets_for(logits, y, self.likelihood, mask)
            if self.likelihood != Likelihood.REGRESSION:
                check_outputs(logits.shape[-1], self.backend)
            wp = None if w is None else _point_weights(w, t, self.dtype)
            loss += B.nll_sum(t, wp).detach().to(self.dtype)
            acts = rec.inputs()
            curv.add_inputs(acts, mask, w)
            cols = loss_columns(t, self.backend, self.n_mc_samples, generator)
            if self.likelihood == Likelihood.CAUSAL_LM and self.backend != Backend.GGN_MC:
                # each token is its own data point: its loss-Hessian columns are backpropagated
                # alone, so no cross terms between tokens enter (Monte-Carlo columns sampled
                # independently per token have none in expectation and go all at once)
                cols = per_position(cols, t.mask)
            cols = list(cols)
            root = None if wp is None else wp.sqrt().unsqueeze(-1)
            for j, s in enumerate(cols):
                s = s if root is None else s * root.to(s.dtype)
                torch.autograd.grad(
                    t.logits,
                    self._params,
                    grad_outputs=s.to(t.logits.dtype),
                    retain_graph=j < len(cols) - 1,
                    allow_unused=True,
                )
                curv.add(acts, rec.output_grads(acts), mask)
        n = t.n_data if wp is None else float((wp * t.mask).sum())
        return n, int(logits.shape[-1])

    def _decompose(self, curv: Curvature, scale: float) -> None:
        self.n_clipped = 0
        self.__dict__.pop("_dense_blocks", None)
        if self.hessian_structure == HessianStructure.KRON:
            blocks, self.n_clipped = curv.kron_eigs(scale)
            self._set_kron(blocks)
        elif self.hessian_structure == HessianStructure.FULL:
            self._H = curv.H * scale
            self._H = 0.5 * (self._H + self._H.T)
        else:
            self._H = curv.H * scale

    def _set_kron(self, blocks: list[tuple]) -> None:
        """Store K-FAC blocks ``(λ_B, Q_B, λ_A, Q_A)`` (eigenvalues, eigenvectors; ``Q`` may hold
        only the leading eigenvectors, see :meth:`compress`)."""
        self._kron = blocks
        self._kron_eigs = [
            lb if la is None else torch.outer(lb, la).reshape(-1) for lb, _, la, _ in blocks
        ]
        # one flat vector and its block index: the log determinant is then a single fused
        # expression per hyper-step instead of a handful of small ops per block
        self._eig_flat = torch.cat(self._kron_eigs)
        self._eig_block = torch.repeat_interleave(
            torch.arange(len(blocks), device=self._eig_flat.device),
            torch.tensor([e.numel() for e in self._kron_eigs], device=self._eig_flat.device),
        )
        self.__dict__.pop("_dense_blocks", None)

    def compress(self, rank: int) -> Laplace:
        """Keep, of every K-FAC factor with more than ``rank`` rows, only its ``rank`` leading
        eigenpairs and replace the other eigenvalues by their mean (an isotropic remainder that
        preserves the trace). Storage per factor drops from ``d²`` to ``d·rank``; the marginal
        likelihood, samples and the GLM predictive use the compressed factors exactly as
        stored. Returns ``self``."""
        self._check_fitted()
        if self.hessian_structure != HessianStructure.KRON:
            raise ValueError("compress() applies to hessian_structure='kron'.")
        if rank < 1:
            raise ValueError(f"rank={rank} must be at least 1.")
        cut: dict[int, tuple[Tensor, Tensor]] = {}  # a shared factor is cut once, stays shared

        def truncate(lam: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
            if id(Q) not in cut:
                cut[id(Q)] = _truncate(lam, Q, rank)
            return cut[id(Q)]

        self._set_kron(
            [
                (*truncate(lb, qb), *((None, None) if la is None else truncate(la, qa)))
                for lb, qb, la, qa in self._kron
            ]
        )
        return self

    def _check_fitted(self) -> None:
        if self.loss is None:
            raise RuntimeError("Call fit(train_loader) before using the Laplace approximation.")

    # ----------------------------------------------------------------- marginal likelihood
    def log_marginal_likelihood(
        self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None
    ) -> Tensor:
        """The Laplace log marginal likelihood (a 0-d tensor), differentiable in both arguments.

        Arguments left out take the stored values; given ones are not stored.
        """
        self._check_fitted()
        prec = self.prior_precision if prior_precision is None else prior_precision
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        prec = torch.as_tensor(prec, dtype=self.dtype, device=self.device).reshape(-1)
        sigma = torch.as_tensor(sigma, dtype=self.dtype, device=self.device).reshape(())
        infer_prior_structure(prec.numel(), self._sizes)
        f = self._H_factor(sigma)
        log_det_ratio = self._log_det_posterior(prec, f) - self._log_det_prior(prec)
        return self._log_likelihood(sigma) - 0.5 * (log_det_ratio + self._scatter(prec))

    @property
    def log_likelihood(self) -> Tensor:
        self._check_fitted()
        return self._log_likelihood(self.sigma_noise)

    def _log_likelihood(self, sigma: Tensor) -> Tensor:
        ll = -self._H_factor(sigma) * self.loss
        if self.likelihood == Likelihood.REGRESSION:
            ll = ll - self.n_data * self.n_outputs * torch.log(sigma * math.sqrt(2 * math.pi))
        return ll

    def _scatter(self, prec: Tensor) -> Tensor:
        """``θ*ᵀ P θ*`` with the squared norms of the fitted mean computed once per fit (the
        hyper-steps evaluate it a hundred times at the same mean)."""
        if prec.numel() == sum(self._sizes):
            return prior_quadratic(prec, self._mean_chunks())
        cached = self.__dict__.get("_mean_sq")
        if cached is None or cached[0] is not self.mean:
            sq = torch.stack([(c * c).sum() for c in self._mean_chunks()])
            cached = self._mean_sq = (self.mean, sq)
        sq = cached[1].to(prec.dtype)
        return prec.reshape(()) * sq.sum() if prec.numel() == 1 else (prec * sq).sum()

    def _mean_chunks(self) -> list[Tensor]:
        return list(torch.split(self.mean, self._sizes))

    def _log_det_prior(self, prec: Tensor) -> Tensor:
        if prec.numel() == 1:
            return self.n_params * torch.log(prec).reshape(())
        if prec.numel() == len(self._sizes):
            return (self._size_vector(prec) * torch.log(prec)).sum()
        return torch.log(prec).sum()

    def _size_vector(self, like: Tensor) -> Tensor:
        v = self.__dict__.get("_sizes_t")
        if v is None or v.dtype != like.dtype or v.device != like.device:
            v = self._sizes_t = torch.tensor(self._sizes, dtype=like.dtype, device=like.device)
        return v

    def _log_det_posterior(self, prec: Tensor, f: Tensor) -> Tensor:
        structure = self.hessian_structure
        if structure == HessianStructure.DIAG:
            return torch.log(f * self._H + per_parameter(prec, self._sizes)).sum()
        if structure == HessianStructure.FULL:
            P = torch.diag(per_parameter(prec, self._sizes))
            return 2 * torch.log(torch.diagonal(torch.linalg.cholesky(f * self._H + P))).sum()
        if prec.numel() == 1:
            return torch.log(f * self._eig_flat + prec[0]).sum()
        if prec.numel() == len(self._sizes):
            return torch.log(f * self._eig_flat + prec[self._eig_block]).sum()
        return self._kron_diag_prior_log_det(prec, f)

    def _kron_diag_prior_log_det(self, prec: Tensor, f: Tensor) -> Tensor:
        """``Σ_blocks log det(f·B⊗A + diag(d))``: a diagonal prior is not diagonal in the
        Kronecker eigenbasis, so each block is factorised densely (blocks up to
        ``MAX_DENSE_BLOCK`` parameters)."""
        total = prec.new_zeros(())
        for d, block in zip(torch.split(prec, self._sizes), self._dense_kron_blocks()):
            total = (
                total
                + 2
                * torch.log(torch.diagonal(torch.linalg.cholesky(f * block + torch.diag(d)))).sum()
            )
        return total

    def _dense_kron_blocks(self) -> list[Tensor]:
        big = [(n, s) for n, s in zip(self.param_names, self._sizes) if s > MAX_DENSE_BLOCK]
        if big:
            raise ValueError(
                f"prior_structure='diag' with hessian_structure='kron' factorises each block "
                f"densely, and {big[0][0]} has {big[0][1]} parameters (limit {MAX_DENSE_BLOCK}). "
                "Use prior_structure='layerwise' or 'scalar' (exact and cheap with K-FAC), or "
                "hessian_structure='diag' with a diagonal prior."
            )
        if not hasattr(self, "_dense_blocks"):
            self._dense_blocks = [self._recompose(i) for i in range(len(self._kron))]
        return self._dense_blocks

    def _recompose(self, i: int) -> Tensor:
        lb, qb, la, qa = self._kron[i]
        Bm = _factor_dense(lb, qb)
        return Bm if la is None else torch.kron(Bm, _factor_dense(la, qa))

    # ----------------------------------------------------------------- predictive
    def __call__(self, batch, pred_type="glm", link_approx="probit", n_samples=100, generator=None):
        """Posterior predictive for a batch (its targets, if any, are ignored): class
        probabilities, or for regression the function's mean and variance. ``pred_type``:
        ``"glm"`` (linearised, ``link_approx`` ``"probit"`` or ``"mc"``) or ``"nn"`` (parameter
        samples); see :mod:`hf_marglik.predictive`."""
        from .predictive import predictive

        return predictive(self, batch, pred_type, link_approx, n_samples, generator)

    # ----------------------------------------------------------------- inspection
    def kron_factors(self) -> list[tuple[Tensor, Tensor | None]]:
        """``(B, A)`` per trainable tensor (``A`` is None for biases), recomposed from the stored
        eigendecomposition (negative eigenvalues clipped)."""
        self._check_fitted()
        if self.hessian_structure != HessianStructure.KRON:
            raise ValueError("kron_factors() needs hessian_structure='kron'.")
        return [
            (_factor_dense(lb, qb), None if la is None else _factor_dense(la, qa))
            for lb, qb, la, qa in self._kron
        ]

    def curvature_dense(self) -> Tensor:
        """The curvature ``H`` (no prior, no ``f``) as a dense ``(P, P)`` matrix in the flat
        parameter order: for tests and small models."""
        self._check_fitted()
        if self.hessian_structure == HessianStructure.FULL:
            return self._H.clone()
        if self.hessian_structure == HessianStructure.DIAG:
            return torch.diag(self._H)
        return torch.block_diag(*[self._recompose(i) for i in range(len(self._kron))])

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Hyperparameters, loss, MAP mean and the curvature in its stored (eigendecomposed for
        K-FAC) form; enough to evaluate the marginal likelihood without the data."""
        self._check_fitted()
        sd = {
            "likelihood": self.likelihood.value,
            "hessian_structure": self.hessian_structure.value,
            "backend": self.backend.value,
            "kfac_approx": self.kfac_approx.value,
            "param_names": list(self.param_names),
            "prior_precision": self.prior_precision.clone(),
            "sigma_noise": self.sigma_noise.clone(),
            "temperature": self.temperature,
            "n_data": self.n_data,
            "n_outputs": self.n_outputs,
            "loss": self.loss.clone(),
            "mean": self.mean.clone(),
        }
        if self.hessian_structure == HessianStructure.KRON:
            sd["kron"] = [tuple(x for x in blk) for blk in self._kron]
        else:
            sd["H"] = self._H.clone()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        for key in ("likelihood", "hessian_structure"):
            if sd[key] != getattr(self, key).value:
                raise ValueError(
                    f"state_dict has {key}={sd[key]!r} but this Laplace has "
                    f"{getattr(self, key).value!r}."
                )
        if list(sd["param_names"]) != self.param_names:
            raise ValueError("state_dict was saved for different trainable parameters.")
        self.backend = coerce(Backend, sd["backend"], "backend")
        self.kfac_approx = coerce(KFACApprox, sd["kfac_approx"], "kfac_approx")
        self.temperature = float(sd["temperature"])
        self.prior_precision = sd["prior_precision"]
        self.sigma_noise = sd["sigma_noise"]
        self.n_data, self.n_outputs = sd["n_data"], sd["n_outputs"]
        self.loss = sd["loss"].to(self.dtype)
        self._mean = sd["mean"].to(self.dtype)
        if "kron" in sd:
            self._set_kron([tuple(x for x in blk) for blk in sd["kron"]])
        else:
            self._H = sd["H"].to(self.dtype)

    # ----------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> None:
        """Write the posterior (``state_dict``) to ``path`` (a ``.pt`` file), atomically, with the
        constructor options so that :meth:`load` needs only the model."""
        sd = self.state_dict()
        sd["options"] = {
            "dict_key_x": self.dict_key_x,
            "dict_key_y": self.dict_key_y,
            "n_mc_samples": self.n_mc_samples,
        }
        tmp = f"{os.fspath(path)}.tmp"
        torch.save(sd, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module) -> Laplace:
        """A fitted :class:`Laplace` over ``model``'s trainable parameters from a file written by
        :meth:`save`; no data needed. The model must hold the same trainable tensors."""
        sd = torch.load(path, map_location="cpu", weights_only=True)
        lap = cls(
            model,
            sd["likelihood"],
            hessian_structure=sd["hessian_structure"],
            backend=sd["backend"],
            kfac_approx=sd["kfac_approx"],
            temperature=sd["temperature"],
            **sd.get("options", {}),
        )
        dev = lap.device
        moved = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in sd.items()}
        if "kron" in moved:
            moved["kron"] = [
                tuple(None if x is None else x.to(dev) for x in blk) for blk in moved["kron"]
            ]
        lap.load_state_dict(moved)
        return lap
