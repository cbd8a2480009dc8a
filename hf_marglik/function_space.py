r"""The exact GGN Laplace over all trainable parameters, in function space (kernel form).

A reference for small training sets: with ``N·C`` outputs (``N`` data points, ``C`` outputs
each) it is exact for any number ``P`` of trainable parameters, at ``O((NC)²)`` memory per
trainable tensor and ``O((NC)³)`` per evidence evaluation, instead of the ``O(P²)`` / ``O(P³)`` of
a dense ``(P, P)`` GGN.

Notation (laplace.py's conventions). ``J`` is the Jacobian of the ``N·C`` outputs (rows
example-major) in the trainable parameters, split per trainable tensor ``l`` as ``J_l``;
``Λ = ⊕_n Λ_n`` the loss Hessian in the outputs at unit noise (softmax cross-entropy:
``Λ_n = diag(p_n) − p_n p_nᵀ``; regression: ``I``); ``f = 1/(σ²T)`` (σ the observation noise,
regression only; ``T`` the temperature); ``H = JᵀΛJ`` the GGN; the prior ``N(μ, P⁻¹)`` with
``P = ⊕_l δ_l I`` (one precision, or one per tensor; ``μ = 0`` unless ``prior_mean`` is given).
``Λ_n = L_n L_nᵀ`` with the ``C × C`` root ``L_n = (I − p_n 1ᵀ) diag(√p_n)`` (its columns are
``√p_c (e_c − p_n)``; ``L_n = I`` for regression), ``L = ⊕_n L_n``.

Kernels: ``K_l = J_l J_lᵀ`` (``NC × NC``), computed once per :meth:`FunctionSpaceLaplace.fit`;
for any prior, ``K(δ) = J P⁻¹ Jᵀ = Σ_l K_l / δ_l``.

Log marginal likelihood (Sylvester: ``det(fH + P) / det P = det(I + f LᵀK(δ)L)``)::

    log p(D) ≈ −f·ℒ(θ*) − c − ½ [log det(I + f LᵀK(δ)L) + Σ_l δ_l ‖θ*_l − μ_l‖²]

with ``ℒ`` the summed loss at unit noise (cross-entropy, or ``½‖f − y‖²``) and ``c = N C
log(σ√(2π))`` for regression (0 otherwise): :meth:`~FunctionSpaceLaplace.log_marginal_likelihood`,
differentiable in ``δ`` and ``σ`` by autograd (one ``NC × NC`` Cholesky).

GLM predictive at test inputs ``x*`` (Jacobian ``J*``), by Woodbury on ``Σ = (fH + P)⁻¹``::

    J* Σ J*ᵀ = K** − f K*ᵀ L (I + f LᵀK(δ)L)⁻¹ Lᵀ K*,   K* = Σ_l J_l J*_lᵀ / δ_l,
                                                          K** = Σ_l J*_l J*_lᵀ / δ_l

pushed through the probit (``softmax(f*/√(1 + π/8·diag))``) or Monte-Carlo link by
:func:`hf_marglik.predictive.categorical`, as ``Laplace`` does. Effective number of parameters per tensor (MacKay)::

    γ_l = P_l − δ_l tr(Σ_ll) = (f/δ_l) tr((I + f LᵀKL)⁻¹ LᵀK_lL),

and the evidence is stationary in ``δ_l`` where ``δ_l ‖θ*_l − μ_l‖² = γ_l``.

Linearised model (Antorán et al., ICML 2022): the evidence of the model linearised at ``θ*``,
``f_lin(θ) = f(θ*) + J(θ − θ*)``, taken at *its own* mode under the prior ``(μ, δ)``. By the
representer theorem that mode is ``θ_lin = μ + P⁻¹Jᵀα``, so the train outputs are
``F = b + K(δ)α`` with ``b = f(θ*) + J(μ − θ*)``; :meth:`~FunctionSpaceLaplace.linearised_mode`
finds ``α`` by Newton's method on ``f·ℒ(b + Kα) + ½ αᵀKα`` (exact in one step for regression),
and its evidence uses ``Λ`` at ``F`` and ``(θ_lin − μ)ᵀP(θ_lin − μ) = αᵀKα``.

Jacobians come from :func:`hf_marglik.predictive.glm_jacobians` (one backward pass per output);
this module touches no curvature library.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .laplace import Laplace
from .options import Likelihood, LinkApprox, coerce
from .predictive import categorical, glm_jacobians

IGNORE_INDEX = -100


def _split(batch, dict_key_y: str):
    if isinstance(batch, Mapping):
        return batch, batch.get(dict_key_y)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch, batch[1]
    raise TypeError("A batch must be a mapping with the targets under dict_key_y or an (x, y).")


def loss_root(logits: Tensor, likelihood: Likelihood) -> Tensor:
    """``(n, C, C)`` roots ``L_n`` with ``L_n L_nᵀ = Λ_n`` (unit noise): the columns of the
    softmax cross-entropy root are ``√p_c (e_c − p)``; the identity for regression."""
    n, k = logits.shape
    if likelihood == Likelihood.REGRESSION:
        return torch.eye(k, dtype=logits.dtype, device=logits.device).expand(n, k, k)
    p = torch.softmax(logits, -1)
    eye = torch.eye(k, dtype=logits.dtype, device=logits.device)
    return (eye - p.unsqueeze(-1)) * p.sqrt().unsqueeze(-2)


def _root_apply(root: Tensor, X: Tensor) -> Tensor:
    """``Lᵀ X`` for ``X`` of shape ``(N·C, m)`` and the block-diagonal root ``L`` (``(N, C, C)``)."""
    n, k, _ = root.shape
    return torch.einsum("ncd,ncm->ndm", root, X.reshape(n, k, -1)).reshape(n * k, -1)


def _sandwich(root: Tensor, K: Tensor, left: bool = True) -> Tensor:
    """``Lᵀ K L`` for ``K`` of shape ``(N·C, N·C)`` (``left=False``: ``L K Lᵀ``), as two batched
    products over the ``C × C`` blocks."""
    n, k, _ = root.shape
    Lt = root.transpose(1, 2) if left else root  # the left factor's blocks
    A = torch.bmm(Lt, K.reshape(n, k, n * k))  # (n, k, n·k): rows transformed
    A = A.reshape(n * k, n, k).transpose(0, 1)  # (m, n·k, k)
    B = torch.bmm(A, Lt.transpose(1, 2))  # columns transformed: (m, n·k, k)
    return B.transpose(0, 1).reshape(n * k, n * k)


@dataclass
class TestKernels:
    """Kernels between the training outputs and the outputs at some test inputs (``m``
    examples, ``C`` outputs), per trainable tensor: computed once, reused for any prior."""

    logits: Tensor  # (m, C): f(θ*) at the test inputs
    cross: Tensor  # (L, N·C, m·C): J_l J*_lᵀ
    blocks: Tensor  # (L, m, C, C): per-example blocks of J*_l J*_lᵀ
    shift: Tensor  # (L, m·C): J*_l (μ_l − θ*_l), for the linearised model's mean
    prior_mean_tag: object = None  # the prior mean that ``shift`` was computed for
    jacobians: list[Tensor] | None = None  # J*_l (m·C, P_l), with ``keep_jacobians``


@dataclass
class LinearisedMode:
    """The mode of the model linearised at ``θ*`` under a prior (see the module docstring)."""

    prior_precision: Tensor
    alpha: Tensor  # (N·C,): θ_lin = μ + P⁻¹ Jᵀ α
    outputs: Tensor  # (N, C): train outputs b + K α of the linear model
    root: Tensor  # (N, C, C): root of Λ at those outputs
    objective: float  # f·ℒ + ½ αᵀKα at the mode
    n_iter: int


class FunctionSpaceLaplace:
    """The exact GGN Laplace over a model's trainable parameters, in function space.

    Args:
        model: the network; its parameters with ``requires_grad=True`` are the posterior's.
        likelihood: ``"classification"`` or ``"regression"``.
        prior_precision: a float or a tensor of length 1 (scalar) or one per trainable tensor
            (layerwise); an infinite precision is not allowed (use :meth:`subset`).
        sigma_noise: observation noise (regression only).
        temperature: ``T`` in ``f = 1 / (σ² T)``.
        prior_mean: the prior's mean as one flat vector over the trainable parameters (default
            zero); enters the scatter term and the linearised model.
        dict_key_x, dict_key_y: keys of the model input and the targets in dict batches.

    Memory after :meth:`fit`: the train Jacobian (``N·C × P`` in the model's dtype) and the
    per-tensor kernels (``L × (N·C)²`` in float64).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str = Likelihood.CLASSIFICATION,
        prior_precision: float | Tensor = 1.0,
        sigma_noise: float | Tensor = 1.0,
        temperature: float = 1.0,
        prior_mean: Tensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
    ):
        self.likelihood = coerce(Likelihood, likelihood, "likelihood")
        if self.likelihood == Likelihood.CAUSAL_LM:
            raise ValueError("FunctionSpaceLaplace covers 'classification' and 'regression'.")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be positive.")
        self.model = model
        self.temperature = float(temperature)
        self.dict_key_y = dict_key_y
        # the Laplace object only supplies glm_jacobians (its sites and parameter list)
        self._lap = Laplace(model, self.likelihood, dict_key_x=dict_key_x, dict_key_y=dict_key_y)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.device = named[0][1].device
        self._active = list(range(len(named)))
        self._mu = None if prior_mean is None else prior_mean.detach().to(torch.float64).reshape(-1)
        if self._mu is not None and self._mu.numel() != sum(self.sizes):
            raise ValueError(f"prior_mean has {self._mu.numel()} entries, not {sum(self.sizes)}.")
        self.prior_precision = prior_precision
        self.sigma_noise = sigma_noise
        self._K: Tensor | None = None
        self._cache: dict = {}

    # ------------------------------------------------------------------ hyperparameters
    @property
    def n_layers(self) -> int:
        return len(self._active)

    @property
    def names(self) -> list[str]:
        """The trainable tensors in the posterior (all, or those kept by :meth:`subset`)."""
        return [self.param_names[i] for i in self._active]

    def _check_prec(self, value) -> Tensor:
        prec = torch.as_tensor(value, dtype=torch.float64, device=self.device).reshape(-1)
        if prec.numel() not in (1, self.n_layers):
            raise ValueError(
                f"A prior precision of length {prec.numel()} fits no structure: use 1 (scalar) "
                f"or {self.n_layers} (layerwise, one per trainable tensor)."
            )
        if not bool(torch.isfinite(prec).all()) or not bool((prec > 0).all()):
            raise ValueError("prior_precision must be positive and finite.")
        return prec

    @property
    def prior_precision(self) -> Tensor:
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value) -> None:
        self._prior_precision = self._check_prec(value)

    @property
    def sigma_noise(self) -> Tensor:
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value) -> None:
        s = torch.as_tensor(value, dtype=torch.float64, device=self.device).reshape(())
        if not (torch.isfinite(s) and s > 0):
            raise ValueError("sigma_noise must be positive and finite.")
        if self.likelihood != Likelihood.REGRESSION and float(s) != 1.0:
            raise ValueError("sigma_noise only applies to likelihood='regression'.")
        self._sigma_noise = s

    def _layer_prec(self, prec: Tensor) -> Tensor:
        return prec.expand(self.n_layers) if prec.numel() == 1 else prec

    def _f(self, sigma: Tensor) -> Tensor:
        return 1.0 / (sigma * sigma * self.temperature)

    # ------------------------------------------------------------------ fitting
    def _check_fitted(self) -> None:
        if self._K is None:
            raise RuntimeError("Call fit(train_loader) first.")

    def fit(self, train_loader: Iterable) -> FunctionSpaceLaplace:
        """Jacobians at the current parameters ``θ*`` on the training data, the per-tensor
        kernels ``K_l = J_l J_lᵀ``, the loss and ``Λ``'s root. Data points with label -100 are
        left out (classification)."""
        n_tensors = len(self.sizes)
        jac: list[list[Tensor]] = [[] for _ in range(n_tensors)]
        logits_all, ys = [], []
        for batch in train_loader:
            _, y = _split(batch, self.dict_key_y)
            logits, chunks = glm_jacobians(self._lap, batch)
            n, k = logits.shape
            keep = self._keep(y, n)
            rows = keep.repeat_interleave(k)
            for i, c in enumerate(chunks):
                jac[i].append(c.detach()[rows])
            logits_all.append(logits[keep].to(torch.float64))
            ys.append(self._targets(y, n, k)[keep])
        self._J = [torch.cat(j) for j in jac]
        del jac
        self.logits = torch.cat(logits_all)
        self.targets = torch.cat(ys)
        self.n_data, self.n_outputs = self.logits.shape
        if self.n_data == 0:
            raise ValueError("The data has no data points (all labels are -100).")
        self.loss = self._nll(self.logits).sum()
        self.root = loss_root(self.logits, self.likelihood)
        self.mean = torch.cat([p.detach().reshape(-1) for p in self._params]).double()
        mu = torch.zeros_like(self.mean) if self._mu is None else self._mu.to(self.mean.device)
        K = []
        for J in self._J:
            J64 = J.to(torch.float64)
            K.append(J64 @ J64.T)
            del J64
        self._K = torch.stack(K)
        del K
        self._K = 0.5 * (self._K + self._K.transpose(1, 2))
        self._set_prior_mean(mu)
        return self

    def _set_prior_mean(self, mu: Tensor) -> None:
        self._mu = mu
        self._mu_tag = object()
        self._diff = list(torch.split(self.mean - mu, self.sizes))  # θ* − μ per tensor
        self._sq = torch.stack([(d * d).sum() for d in self._diff])
        self._shift = torch.stack(
            [-(J.to(torch.float64) @ d) for J, d in zip(self._J, self._diff)]
        )  # J_l (μ_l − θ*_l)
        self._cache = {}

    def with_prior_mean(self, prior_mean: Tensor | None) -> FunctionSpaceLaplace:
        """The same posterior family with the prior centred at ``prior_mean`` (a flat vector over
        all trainable parameters; None: zero), sharing this one's kernels. :class:`TestKernels`
        for the linearised model's mean must then come from the new object."""
        self._check_fitted()
        mu = torch.zeros_like(self.mean) if prior_mean is None else prior_mean
        mu = mu.detach().to(self.mean).reshape(-1)
        if mu.numel() != self.mean.numel():
            raise ValueError(f"prior_mean has {mu.numel()} entries, not {self.mean.numel()}.")
        new = object.__new__(FunctionSpaceLaplace)
        new.__dict__.update(self.__dict__)
        new._set_prior_mean(mu)
        return new

    def _keep(self, y, n: int) -> Tensor:
        if self.likelihood == Likelihood.CLASSIFICATION:
            return (y != IGNORE_INDEX).to(self.device).reshape(-1)
        return torch.ones(n, dtype=torch.bool, device=self.device)

    def _targets(self, y: Tensor, n: int, k: int) -> Tensor:
        y = y.to(self.device)
        if self.likelihood == Likelihood.CLASSIFICATION:
            return y.reshape(-1).long()
        return y.reshape(n, k).to(torch.float64)

    def _nll(self, F: Tensor) -> Tensor:
        """Per-point loss at unit noise: cross-entropy, or ``½‖F − y‖²``."""
        if self.likelihood == Likelihood.REGRESSION:
            return 0.5 * ((F - self.targets) ** 2).sum(-1)
        return -torch.log_softmax(F, -1).gather(-1, self.targets[:, None]).squeeze(-1)

    def _pick(self, stack: Tensor) -> Tensor:
        """The active tensors' entries of a per-tensor stack (no copy when all are active)."""
        if self._active == list(range(stack.shape[0])):
            return stack
        return stack[self._active]

    def subset(self, names: Sequence[str]) -> FunctionSpaceLaplace:
        """The posterior over the tensors ``names`` only, the others held fixed at ``θ*`` (e.g.
        a last-layer Laplace), sharing this one's kernels; prior precision reset to scalar 1."""
        self._check_fitted()
        missing = [n for n in names if n not in self.param_names]
        if missing or not names:
            raise ValueError(f"subset: unknown or no tensor names {missing}.")
        new = object.__new__(FunctionSpaceLaplace)
        new.__dict__.update(self.__dict__)
        new._active = [self.param_names.index(n) for n in names]
        new._prior_precision = self._check_prec(1.0)
        new._cache = {}
        return new

    # ------------------------------------------------------------------ evidence
    def kernel(self, prior_precision: Tensor | None = None) -> Tensor:
        """``K(δ) = Σ_l K_l / δ_l`` over the active tensors, ``(N·C, N·C)``."""
        self._check_fitted()
        prec = self.prior_precision if prior_precision is None else self._as_prec(prior_precision)
        w = 1.0 / self._layer_prec(prec)
        return torch.tensordot(w, self._pick(self._K), 1)

    def _as_prec(self, value) -> Tensor:
        prec = torch.as_tensor(value, dtype=torch.float64, device=self.device).reshape(-1)
        if prec.numel() not in (1, self.n_layers):
            self._check_prec(prec.detach())  # raises with the valid lengths
        return prec

    def _system(self, prec: Tensor, sigma: Tensor, root: Tensor):
        """``(f, K, chol(I + f LᵀKL))``."""
        f = self._f(sigma)
        K = self.kernel(prec)
        M = f * _sandwich(root, K)
        M = M + torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
        return f, K, torch.linalg.cholesky(M)

    def _scatter(self, prec: Tensor) -> Tensor:
        sq = self._sq[self._active].to(prec.dtype)
        return prec.reshape(()) * sq.sum() if prec.numel() == 1 else (prec * sq).sum()

    def log_likelihood(self, sigma_noise: Tensor | None = None) -> Tensor:
        """``log p(D | θ*) = −f·ℒ − c``."""
        self._check_fitted()
        sigma = self.sigma_noise if sigma_noise is None else torch.as_tensor(sigma_noise)
        sigma = sigma.to(torch.float64).reshape(())
        ll = -self._f(sigma) * self.loss
        if self.likelihood == Likelihood.REGRESSION:
            ll = ll - self.n_data * self.n_outputs * torch.log(sigma * math.sqrt(2 * math.pi))
        return ll

    def log_marginal_likelihood(
        self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None
    ) -> Tensor:
        """The exact GGN Laplace log marginal likelihood at ``θ*`` (a 0-d tensor),
        differentiable in both arguments; arguments left out take the stored values."""
        self._check_fitted()
        prec = self.prior_precision if prior_precision is None else self._as_prec(prior_precision)
        sigma = self.sigma_noise if sigma_noise is None else torch.as_tensor(sigma_noise)
        sigma = sigma.to(torch.float64).reshape(())
        _, _, C = self._system(prec, sigma, self.root)
        log_det_ratio = 2 * torch.log(torch.diagonal(C)).sum()
        return self.log_likelihood(sigma) - 0.5 * (log_det_ratio + self._scatter(prec))

    def effective_parameters(self, prior_precision: Tensor | None = None) -> Tensor:
        """``γ_l = P_l − δ_l tr(Σ_ll)`` per active tensor (MacKay's effective number of
        well-determined parameters), at the stored ``σ``."""
        prec = self.prior_precision if prior_precision is None else self._as_prec(prior_precision)
        return self._gamma(prec.detach(), self.root)

    def _gamma(self, prec: Tensor, root: Tensor) -> Tensor:
        f, _, C = self._system(prec, self.sigma_noise, root)
        G = _sandwich(root, torch.cholesky_inverse(C), left=False)  # L M⁻¹ Lᵀ
        K = self._pick(self._K)
        traces = K.reshape(K.shape[0], -1) @ G.reshape(-1)  # tr(M⁻¹ LᵀK_lL), K_l symmetric
        return f * traces / self._layer_prec(prec)

    def scatter_per_tensor(self) -> Tensor:
        """``‖θ*_l − μ_l‖²`` per active tensor."""
        self._check_fitted()
        return self._sq[self._active].clone()

    def optimize_prior_precision(
        self,
        prior_structure: str = "layerwise",
        init: Tensor | float | None = None,
        max_iter: int = 500,
        tol: float = 1e-9,
    ) -> Tensor:
        """Maximise :meth:`log_marginal_likelihood` over ``log δ`` (scalar or layerwise) with
        L-BFGS; stores and returns the optimum."""
        self._check_fitted()
        n = 1 if prior_structure == "scalar" else self.n_layers
        start = self.prior_precision if init is None else self._check_prec(init)
        if start.numel() != n:
            start = start.detach().log().mean().exp().expand(n).clone()
        best = maximise_evidence(self.log_marginal_likelihood, start, max_iter, tol)
        self.prior_precision = best
        return best

    # ------------------------------------------------------------------ linearised model
    def linearised_mode(
        self,
        prior_precision: Tensor | None = None,
        max_iter: int = 100,
        tol: float = 1e-10,
        init: LinearisedMode | None = None,
    ) -> LinearisedMode:
        """The mode of the model linearised at ``θ*`` under the prior ``(μ, δ)``, by Newton's
        method in ``α`` with backtracking (see the module docstring)."""
        self._check_fitted()
        prec = self.prior_precision if prior_precision is None else self._as_prec(prior_precision)
        prec = prec.detach()
        f = self._f(self.sigma_noise)
        K = self.kernel(prec)
        b = self.logits + self._pick(self._shift).sum(0).reshape(self.logits.shape)
        b = b.reshape(-1)

        def objective(a: Tensor) -> tuple[Tensor, Tensor]:
            F = b + K @ a
            return f * self._nll(F.reshape(self.logits.shape)).sum() + 0.5 * a @ (K @ a), F

        alpha = torch.zeros_like(b) if init is None else init.alpha.clone()
        obj, F = objective(alpha)
        it = 0
        while it < max_iter:
            it += 1
            Fm = F.reshape(self.logits.shape)
            root = loss_root(Fm, self.likelihood)
            if self.likelihood == Likelihood.REGRESSION:
                g = (Fm - self.targets).reshape(-1)
            else:
                g = torch.softmax(Fm, -1) - nn.functional.one_hot(self.targets, Fm.shape[1])
                g = g.reshape(-1)
            g = f * g
            # α_new = (I + f L Lᵀ K)⁻¹ c,  c = f L Lᵀ (F − b) − g   (Woodbury)
            c = f * _root_apply(root.transpose(1, 2), _root_apply(root, (F - b)[:, None]))
            c = c.reshape(-1) - g
            Mc = torch.linalg.cholesky(
                torch.eye(b.numel(), dtype=b.dtype, device=b.device) + f * _sandwich(root, K)
            )
            v = torch.cholesky_solve(_root_apply(root, (K @ c)[:, None]), Mc)
            target = c - f * _root_apply(root.transpose(1, 2), v).reshape(-1)
            step = target - alpha
            t = 1.0
            while True:
                new_obj, new_F = objective(alpha + t * step)
                if new_obj <= obj or t < 1e-8:
                    break
                t *= 0.5
            alpha, decrease, obj, F = alpha + t * step, float(obj - new_obj), new_obj, new_F
            if abs(decrease) <= tol * max(1.0, abs(float(obj))):
                break
        Fm = F.reshape(self.logits.shape)
        return LinearisedMode(prec, alpha, Fm, loss_root(Fm, self.likelihood), float(obj), it)

    def linearised_log_marginal_likelihood(self, mode: LinearisedMode) -> Tensor:
        """The Laplace evidence of the linearised model at its mode: ``−f·ℒ(F) − c −
        ½[log det(I + f L_FᵀKL_F) + αᵀKα]``, ``L_F`` the root of ``Λ`` at the outputs ``F``."""
        sigma = self.sigma_noise
        _, K, C = self._system(mode.prior_precision, sigma, mode.root)
        ll = -self._f(sigma) * self._nll(mode.outputs).sum()
        if self.likelihood == Likelihood.REGRESSION:
            ll = ll - self.n_data * self.n_outputs * torch.log(sigma * math.sqrt(2 * math.pi))
        quad = mode.alpha @ (K @ mode.alpha)
        return ll - 0.5 * (2 * torch.log(torch.diagonal(C)).sum() + quad)

    def linearised_effective_parameters(self, mode: LinearisedMode) -> Tensor:
        """``γ_l`` of the linearised model's Laplace posterior at its mode (``Λ`` at ``F``)."""
        return self._gamma(mode.prior_precision, mode.root)

    def linearised_scatter(self, mode: LinearisedMode) -> Tensor:
        """``‖θ_lin,l − μ_l‖² = αᵀK_lα / δ_l²`` per active tensor."""
        Ka = torch.einsum("lij,j->li", self._pick(self._K), mode.alpha)
        return (Ka @ mode.alpha) / self._layer_prec(mode.prior_precision) ** 2

    def optimize_linearised(
        self,
        init: Tensor | None = None,
        max_iter: int = 500,
        rtol: float = 1e-6,
        callback: Callable[[int, Tensor, float], None] | None = None,
        max_precision: float = 1e8,
    ) -> tuple[Tensor, LinearisedMode, int]:
        """MacKay's fixed point on the linearised model's evidence (Antorán et al.'s EM):
        alternate the linearised mode and ``δ_l ← γ_l / ‖θ_lin,l − μ_l‖²`` (``γ`` with ``Λ`` at
        the mode) until ``δ`` changes by less than ``rtol`` (relative, largest entry) or
        ``max_iter`` steps; ``callback(step, δ, change)`` after each step. Returns ``(δ, mode,
        steps)``.

        A tensor that the linearised evidence switches off (automatic relevance determination:
        ``δ_l → ∞`` geometrically) is held at ``max_precision`` and left out of the
        convergence test."""
        prec = self._layer_prec(self.prior_precision if init is None else self._check_prec(init))
        prec = prec.detach().clone()
        mode = None
        it = 0
        while it < max_iter:
            it += 1
            mode = self.linearised_mode(prec, init=mode)
            gamma = self._gamma(prec, mode.root)
            new = (gamma / self.linearised_scatter(mode).clamp_min(1e-300)).clamp(max=max_precision)
            free = (new < max_precision) | (prec < max_precision)
            change = float(((new - prec).abs() / prec)[free].max()) if bool(free.any()) else 0.0
            prec = new
            if callback is not None:
                callback(it, prec, change)
            if change < rtol:
                break
        mode = self.linearised_mode(prec, init=mode)
        return prec, mode, it

    # ------------------------------------------------------------------ predictive
    def test_kernels(self, batch, keep_jacobians: bool = False) -> TestKernels:
        """Cross-kernels between the training outputs and the outputs at ``batch``'s inputs
        (its targets, if any, are ignored), for every trainable tensor; with
        ``keep_jacobians`` also the test Jacobians (e.g. for another posterior's predictive)."""
        self._check_fitted()
        logits, chunks = glm_jacobians(self._lap, batch)
        m, k = logits.shape
        cross, blocks, shift = [], [], []
        for J, Js, d in zip(self._J, chunks, self._diff):
            Js = Js.detach().to(torch.float64)
            cross.append(J.to(torch.float64) @ Js.T)
            J3 = Js.reshape(m, k, -1)
            blocks.append(torch.einsum("mcp,mdp->mcd", J3, J3))
            shift.append(-(Js @ d))
        return TestKernels(
            logits.detach().to(torch.float64),
            torch.stack(cross),
            torch.stack(blocks),
            torch.stack(shift),
            self._mu_tag,
            chunks if keep_jacobians else None,
        )

    def rebase(self, kernels: TestKernels) -> TestKernels:
        """``kernels`` with the linearised model's mean shift ``J*_l(μ_l − θ*_l)`` recomputed for
        this object's prior mean (``kernels`` must keep their Jacobians)."""
        if kernels.jacobians is None:
            raise ValueError("rebase needs test_kernels(..., keep_jacobians=True).")
        shift = torch.stack(
            [-(Js.detach().to(torch.float64) @ d) for Js, d in zip(kernels.jacobians, self._diff)]
        )
        return dataclasses.replace(kernels, shift=shift, prior_mean_tag=self._mu_tag)

    def functional_covariance(
        self,
        kernels: TestKernels,
        prior_precision: Tensor | None = None,
        mode: LinearisedMode | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Mean ``(m, C)`` and covariance ``(m, C, C)`` of the linearised network's outputs at
        the test inputs of ``kernels``: at ``θ*`` (the GLM predictive), or, with ``mode``, the
        Laplace posterior of the linearised model at its own mode."""
        self._check_fitted()
        if mode is not None:
            prec, root = mode.prior_precision, mode.root
        else:
            prec = (
                self.prior_precision if prior_precision is None else self._as_prec(prior_precision)
            )
            root = self.root
        prec = prec.detach()
        w = 1.0 / self._layer_prec(prec)
        f, _, C = self._cached_system(prec, root)
        m, k = kernels.logits.shape
        Ks = torch.tensordot(w, self._pick(kernels.cross), 1)  # (N·C, m·C)
        Kss = torch.tensordot(w, self._pick(kernels.blocks), 1)
        V = torch.linalg.solve_triangular(C, _root_apply(root, Ks), upper=False)
        V3 = V.reshape(-1, m, k)
        cov = Kss - f * torch.einsum("amc,amd->mcd", V3, V3)
        mean = kernels.logits
        if mode is not None:
            if kernels.prior_mean_tag is not self._mu_tag:
                raise ValueError("kernels were computed for another prior mean.")
            shift = self._pick(kernels.shift).sum(0).reshape(m, k)
            mean = mean + shift + (Ks.T @ mode.alpha).reshape(m, k)
        return mean, cov

    def _cached_system(self, prec: Tensor, root: Tensor):
        """``_system`` for the predictive, kept for the last prior (many test batches)."""
        key = (tuple(prec.tolist()), float(self.sigma_noise))
        if self._cache.get("key") != key or self._cache.get("root") is not root:
            f, _, C = self._system(prec, self.sigma_noise, root)
            self._cache = {"key": key, "root": root, "value": (f, C)}
        f, C = self._cache["value"]
        return f, None, C

    def predict(
        self,
        kernels: TestKernels,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        prior_precision: Tensor | None = None,
        mode: LinearisedMode | None = None,
    ):
        """Class probabilities ``(m, C)`` (the link of :func:`hf_marglik.predictive.categorical`),
        or for regression the function's mean ``(m, C)`` and covariance ``(m, C, C)``, from
        precomputed :class:`TestKernels` (cheap for many priors)."""
        link_approx = coerce(LinkApprox, link_approx, "link_approx")
        mean, cov = self.functional_covariance(kernels, prior_precision, mode)
        if self.likelihood == Likelihood.REGRESSION:
            return mean, cov
        return categorical(mean, cov, link_approx, n_samples, generator)

    def __call__(self, batch, link_approx="probit", n_samples=100, generator=None):
        """The GLM predictive for a batch, as :class:`~hf_marglik.Laplace` ``(batch, "glm",
        link_approx)``."""
        return self.predict(self.test_kernels(batch), link_approx, n_samples, generator)


def maximise_evidence(
    log_marginal_likelihood: Callable[[Tensor], Tensor],
    init: Tensor,
    max_iter: int = 500,
    tol: float = 1e-9,
) -> Tensor:
    """``argmax_δ log_marginal_likelihood(δ)`` over ``log δ`` with L-BFGS (strong Wolfe line
    search) from ``init``; works for any evidence callable, e.g. a K-FAC
    :meth:`Laplace.log_marginal_likelihood`. Returns the detached optimum (float64)."""
    log_prec = init.detach().to(torch.float64).log().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [log_prec],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = -log_marginal_likelihood(log_prec.exp())
        loss.backward()
        return loss

    for _ in range(5):  # restarts: L-BFGS may stop on tolerance_change before the gradient
        opt.step(closure)
        if float(log_prec.grad.abs().max()) <= tol * 10:
            break
    return log_prec.detach().exp()
