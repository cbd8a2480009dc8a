"""The Laplace approximation over the trainable parameters, and its log marginal likelihood.

With ``H`` the GGN/Fisher of the summed negative log likelihood at unit noise, ``P`` the prior
precision (a Gaussian prior centred at ``μ = prior_mean``, 0 by default), ``f = 1 / (σ² T)``
(σ the observation noise, regression only; T the temperature) and ``θ*`` the trainable
parameters at the MAP (Immer et al., ICML 2021; laplace-torch's conventions)::

    log p(D) ≈ −f·L(θ*) − c − ½ (log det(f·H + P) − log det P + (θ* − μ)ᵀ P (θ* − μ))

where ``L`` is the summed loss (cross-entropy, or ``½‖f − y‖²`` for regression) and
``c = N·K·log(σ√(2π))`` for regression (0 otherwise). For K-FAC blocks ``B ⊗ A`` with an
isotropic prior ``δ`` per block, ``log det(f·B⊗A + δI) = Σ_ij log(f·λ_i(B)·λ_j(A) + δ)``: the
factors are eigendecomposed once per :meth:`Laplace.fit`, so the marginal likelihood and its
gradients in ``(P, σ)`` are cheap to evaluate many times.

The curvature lives in a :class:`~hf_marglik.posterior.Posterior` (one class per structure);
the prior in a :class:`~hf_marglik.prior.Prior`. :class:`Laplace` answers laplace-torch's
``BaseLaplace`` API through them (``scatter``, ``log_det_ratio``, ``posterior_precision``,
``sample``, ``functional_variance``, ``predictive_samples``, ``log_prob``,
``optimize_prior_precision``, ``__call__``).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch import Tensor, nn

from .checkpoint import save_torch
from .curvature import (
    CurvatureSettings,
    FitResult,
    fit_curvature,
    linear_sites,
    output_jacobians,
)
from .options import (
    Backend,
    HessianStructure,
    KFACApprox,
    Likelihood,
    PriorStructure,
    SubsetOfWeights,
    coerce,
)
from .parallel import from_first_process
from .posterior import MAX_DENSE_BLOCK, KronPosterior, Posterior, posterior_from_state
from .prior import Prior, flat_index, select_parameters, trainable_parameters
from .quantization import keep_4bit_differentiable

__all__ = ["Laplace", "MAX_DENSE_BLOCK", "NonFiniteFitError", "default_kfac_approx"]

MAX_GLM_OUTPUTS = 64
"""``pred_type='glm'`` takes one backward pass per output: refused above this many outputs."""


class NonFiniteFitError(RuntimeError):
    """A posterior was asked of a :class:`Laplace` whose fit was not finite
    (:attr:`Laplace.fit_error`)."""


def default_kfac_approx(likelihood: Likelihood) -> KFACApprox:
    """``expand`` for every likelihood, as measured (BENCHMARKS.md, "K-FAC fidelity": relative
    error of ``log det(I + H/δ)`` against the exact GGN on small LoRA models). Causal LM: expand
    is the exact choice for per-token losses (Eschenhagen et al., 2023)."""
    return KFACApprox.EXPAND


class Laplace:
    """A Gaussian posterior ``N(θ*, (f·H + P)⁻¹)`` over the parameters with ``requires_grad=True``.

    Args:
        model: the network; frozen parameters are never touched or copied (bitsandbytes 4-bit
            layers only have their CPU bfloat16 inference repacking turned off,
            :func:`hf_marglik.quantization.keep_4bit_differentiable`).
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
            expand (:func:`default_kfac_approx`).
        dict_key_x, dict_key_y: keys of the model input and the targets in dict batches.
        n_mc_samples: samples per example for ``"ggn-mc"``.
        enable_backprop: laplace-torch's flag to make the marginal likelihood differentiable in
            the model parameters. Accepted for signature compatibility; ``True`` is refused
            (hf_marglik's curvature is detached from the parameters).
        seed: seed of the Monte-Carlo targets (a fit is then reproducible). They are keyed by
            the seed and a hash of each example's input (:mod:`hf_marglik.draws`), so a fit's
            labels do not depend on the batches or the number of data-parallel processes. None:
            a seed drawn from torch's global generator at each fit.
        factor_rank: memory-bounded K-FAC: a factor wider than ``2·factor_rank + 10`` is
            accumulated as a streaming Nyström sketch and kept as its ``factor_rank`` leading
            eigenpairs plus a two-moment tail (:mod:`hf_marglik.factors`); memory per
            factor ``d·(factor_rank + 10)`` instead of ``d²``. None (default): dense factors.
        subset_of_weights: ``"all"`` (default: every trainable tensor) or ``"last_layer"``
            (the trained output layer only, or without one the LoRA of the last adapted layer;
            the others fixed at the MAP; laplace-torch's option,
            :class:`~hf_marglik.SubsetOfWeights`). A fitted Laplace over all tensors
            gives the same last-layer posterior without a new fit: :meth:`restricted_to`.
        predictive_subset_of_weights: the tensors the predictive (``__call__``,
            ``predictive_samples``, ``optimize_prior_precision(method="gridsearch")``)
            marginalises over; the marginal likelihood stays over ``subset_of_weights``.
        prior_mean: the prior's mean ``μ`` (laplace-torch's): 0 (default), a float, or one value
            per trainable parameter (a flat vector in ``named_parameters()`` order), e.g. the
            parameters at initialisation; the scatter term is ``(θ* − μ)ᵀ P (θ* − μ)``.
        batch_columns: backpropagate the exact GGN's loss-Hessian columns (and the GLM
            predictive's per-output Jacobian rows) 16 at a time in one ``vmap``-ed backward
            pass (``torch.autograd.grad(..., is_grads_batched=True)``) instead of one by one;
            the same numbers (tested to rounding). Off by default: on CPU it costs 5–25% more
            than the loop, because the work is in the backward's FLOPs, not its overhead
            (BENCHMARKS.md, "Batched columns"); it may pay where a backward is launch-bound
            (small batches on a GPU; not measured). Ignored with gradient checkpointing.
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
        subset_of_weights: SubsetOfWeights | str = SubsetOfWeights.ALL,
        predictive_subset_of_weights: SubsetOfWeights | str = SubsetOfWeights.ALL,
        prior_mean: float | Tensor = 0.0,
        *,
        batch_columns: bool = False,
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
        self.batch_columns = bool(batch_columns)
        self.subset_of_weights = coerce(SubsetOfWeights, subset_of_weights, "subset_of_weights")
        keep_4bit_differentiable(model)  # a k-bit base: no bf16 repacking on CPU
        named = trainable_parameters(model)
        named = [named[i] for i in select_parameters(named, self.subset_of_weights)]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        """The trainable tensors the posterior is over (``named_parameters`` order)."""
        self.sizes = [p.numel() for p in self.params]
        self.sites = linear_sites(model, named)
        self.dtype = torch.float64 if self.params[0].dtype == torch.float64 else torch.float32
        self.device = self.params[0].device
        prec = torch.as_tensor(prior_precision, dtype=self.dtype).reshape(-1)
        if prior_structure is not None and prec.numel() == 1:
            structure = coerce(PriorStructure, prior_structure, "prior_structure")
            prec = prec.expand(Prior.size(structure, self.sizes)).clone()
        self.prior_precision = prec
        self._predictive_prior: Prior | None = None
        self.sigma_noise = sigma_noise
        self.posterior: Posterior | None = None
        """The fitted curvature (None before :meth:`fit`)."""
        self.n_data: int | None = None
        self.n_outputs: int | None = None
        self.loss: Tensor | None = None
        self.fit_error: str | None = None
        """What was not finite in the fit this Laplace came from (None for a usable posterior):
        set by :meth:`without_posterior`; every posterior method then raises
        :class:`NonFiniteFitError`."""
        self._mean: Tensor | None = None
        self._mean_sq: tuple[Tensor, Tensor] | None = None
        self.prior_mean = prior_mean
        self.predictive_subset_of_weights = predictive_subset_of_weights

    # ----------------------------------------------------------------- subsets of weights
    @property
    def predictive_subset_of_weights(self) -> SubsetOfWeights:
        """The tensors the predictive marginalises over (the others stay at the MAP):
        ``"all"`` of this Laplace's, or its ``"last_layer"``; saved with the posterior."""
        return self._predictive_subset

    @predictive_subset_of_weights.setter
    def predictive_subset_of_weights(self, value: SubsetOfWeights | str) -> None:
        value = coerce(SubsetOfWeights, value, "predictive_subset_of_weights")
        indices = select_parameters(list(zip(self.param_names, self.params)), value)
        self._predictive_indices = indices
        self._predictive_subset = value
        # the layers of the predictive's tensors, found once (not per predictive batch)
        self._predictive_sites = (
            self.sites if len(indices) == len(self.params) else self._sites_of(indices)
        )

    def restricted_to(self, subset_of_weights: SubsetOfWeights | str) -> Laplace:
        """This Laplace over the tensors ``subset_of_weights`` selects only, the others fixed at
        the MAP, without a new fit: the curvature's ``H_SS`` block, the prior's (and the
        predictive prior's) entries, the mean's. The same numbers as fitting
        ``Laplace(..., subset_of_weights=...)`` at the same parameters (for every structure:
        K-FAC and the diagonal are block-diagonal, ``full`` keeps the sub-matrix). The blocks are
        shared, not copied; the restriction's predictive is over all its tensors."""
        subset = coerce(SubsetOfWeights, subset_of_weights, "subset_of_weights")
        indices = select_parameters(list(zip(self.param_names, self.params)), subset)
        return self._restricted(indices, subset, self._sites_of(indices))

    def predictive_view(self) -> Laplace:
        """The Laplace the predictive uses: ``self``, or :meth:`restricted_to` the
        ``predictive_subset_of_weights``."""
        if len(self._predictive_indices) == len(self.params):
            return self
        return self._restricted(
            self._predictive_indices, self._predictive_subset, self._predictive_sites
        )

    def predictive_prior_of(self, prior: Prior) -> Prior:
        """A prior over this Laplace's tensors restricted to the predictive's tensors."""
        if len(self._predictive_indices) == len(self.params):
            return prior
        return prior.subset(self._predictive_indices)

    def _sites_of(self, indices: list[int]):
        return linear_sites(self.model, [(self.param_names[i], self.params[i]) for i in indices])

    def _restricted(self, indices: list[int], subset: SubsetOfWeights, sites) -> Laplace:
        out = object.__new__(Laplace)
        out.__dict__.update(self.__dict__)
        out.subset_of_weights = subset
        out.param_names = [self.param_names[i] for i in indices]
        out.params = [self.params[i] for i in indices]
        out.sizes = [self.sizes[i] for i in indices]
        out.sites = sites
        out._prior = self._prior.subset(indices)
        out._predictive_prior = (
            None if self._predictive_prior is None else self._predictive_prior.subset(indices)
        )
        if self.posterior is not None:
            out.posterior = self.posterior.subset(indices)
        if self._mean is not None:
            out._mean = self._mean[flat_index(self.sizes, indices, self._mean.device)]
        out._mean_sq = None
        if isinstance(self._prior_mean, Tensor):
            out._prior_mean = self._prior_mean[flat_index(self.sizes, indices, self.device)]
        out._predictive_subset = SubsetOfWeights.ALL
        out._predictive_indices = list(range(len(indices)))
        out._predictive_sites = sites
        return out

    # ----------------------------------------------------------------- hyperparameters
    @property
    def n_params(self) -> int:
        return sum(self.sizes)

    @property
    def n_layers(self) -> int:
        return len(self.sizes)

    @property
    def prior(self) -> Prior:
        """The prior precision with its layout over the trainable tensors."""
        return self._prior

    @property
    def prior_structure(self) -> PriorStructure:
        return self._prior.structure

    @property
    def prior_precision(self) -> Tensor:
        return self._prior.values

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        prec = torch.as_tensor(value, dtype=self.dtype, device=self.device).reshape(-1)
        prior = Prior(prec, self.sizes)  # a length that fits no structure is a ValueError
        if not torch.isfinite(prec).all() or not (prec > 0).all():
            raise ValueError(f"prior_precision must be positive and finite; got {value}.")
        self._prior = prior

    @property
    def predictive_prior_precision(self) -> Tensor | None:
        """A prior precision for the predictive only (``__call__``, ``predictive_samples``):
        tuned on validation data after training (``MargLikTrainingArguments.predictive_prior``)
        while ``prior_precision`` stays what the marginal likelihood learned. None (default):
        the predictive uses ``prior_precision``. Setting ``prior_precision`` by
        :meth:`optimize_prior_precision` clears it. ``float("inf")`` (every entry): no posterior
        variance, the predictive is the MAP's without any Jacobian or sample (what the tuning
        picks when the validation split prefers the MAP to every grid value)."""
        return None if self._predictive_prior is None else self._predictive_prior.values

    @predictive_prior_precision.setter
    def predictive_prior_precision(self, value: float | Tensor | None) -> None:
        if value is None:
            self._predictive_prior = None
            return
        prec = torch.as_tensor(value, dtype=self.dtype, device=self.device).reshape(-1)
        prior = Prior(prec, self.sizes)
        if not prior.is_point_mass and (not torch.isfinite(prec).all() or not (prec > 0).all()):
            raise ValueError(
                f"predictive_prior_precision must be positive and finite, or inf everywhere "
                f"(the MAP's predictive); got {value}."
            )
        self._predictive_prior = prior

    @property
    def predictive_prior(self) -> Prior:
        """The prior the predictive uses: ``predictive_prior_precision`` if set, else ``prior``."""
        return self._prior if self._predictive_prior is None else self._predictive_prior

    @property
    def prior_precision_diag(self) -> Tensor:
        """``diag(P)``: one prior precision per parameter (laplace-torch's name)."""
        return self._prior.per_parameter()

    @property
    def prior_mean(self) -> float | Tensor:
        """The prior's mean ``μ``: a float (every parameter) or a flat vector over the trainable
        parameters (laplace-torch's ``prior_mean``)."""
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value: float | Tensor) -> None:
        if isinstance(value, Tensor) and value.numel() > 1:
            mu = value.detach().to(self.device, self.dtype).reshape(-1)
            if mu.numel() != self.n_params:
                raise ValueError(
                    f"prior_mean has {mu.numel()} entries; give a float or one value per "
                    f"trainable parameter ({self.n_params})."
                )
        else:
            mu = float(value)
        if not (torch.isfinite(mu).all() if isinstance(mu, Tensor) else math.isfinite(mu)):
            raise ValueError("prior_mean must be finite.")
        self._prior_mean = mu
        self._mean_sq = None

    @property
    def sigma_noise(self) -> Tensor:
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        sigma = torch.as_tensor(value, dtype=self.dtype, device=self.device).reshape(())
        if not torch.isfinite(sigma) or not sigma > 0:
            raise ValueError(f"sigma_noise must be positive and finite; got {value}.")
        if self.likelihood != Likelihood.REGRESSION and float(sigma) != 1.0:
            raise ValueError(
                f"sigma_noise={float(sigma)} only applies to likelihood='regression'; leave it at "
                "1.0 for categorical likelihoods."
            )
        self._sigma_noise = sigma

    def likelihood_factor(self, sigma_noise: Tensor | None = None) -> Tensor:
        """``f = 1 / (σ² T)``, the factor of the curvature and the loss in the log posterior."""
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        return 1.0 / (sigma * sigma * self.temperature)

    @property
    def mean(self) -> Tensor:
        """The trainable parameters at the time of the fit, as one flat detached vector."""
        if self._mean is None:
            return torch.cat([p.detach().reshape(-1) for p in self.params]).to(self.dtype)
        return self._mean

    @property
    def n_clipped(self) -> int:
        """Negative K-FAC eigenvalues (rounding) clipped to 0 by the last fit."""
        return 0 if self.posterior is None else self.posterior.n_clipped

    # ----------------------------------------------------------------- fitting
    @property
    def curvature_settings(self) -> CurvatureSettings:
        """How this approximation's curvature is computed (structure, backend, K-FAC variant,
        batch keys, Monte-Carlo samples, factor rank)."""
        return CurvatureSettings(
            self.likelihood,
            self.hessian_structure,
            self.backend,
            self.kfac_approx,
            self.dict_key_x,
            self.dict_key_y,
            self.n_mc_samples,
            self.factor_rank,
            self.batch_columns,
        )

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
        seed = self.seed
        if seed is None and self.backend == Backend.GGN_MC:
            # reproducible under torch.manual_seed; the first process's in a data-parallel run
            seed = from_first_process(int(torch.randint(2**62, ())))
        result = fit_curvature(
            self.model,
            train_loader,
            self.params,
            self.sites,
            self.curvature_settings,
            dtype=self.dtype,
            device=self.device,
            n_data=n_data,
            seed=0 if seed is None else seed,
            example_weights=example_weights,
            progress_bar=progress_bar,
        )
        return self.fit_from(result)

    def fit_from(self, result: FitResult) -> Laplace:
        """Use a curvature and loss computed elsewhere (for example gathered during training,
        :mod:`hf_marglik.online`), with the current parameters as the mean."""
        self.posterior, self.loss, self.fit_error = result.posterior, result.loss, None
        self.n_data, self.n_outputs = result.n_data, result.n_outputs
        self._mean = torch.cat([p.detach().reshape(-1) for p in self.params]).to(self.dtype)
        self._mean_sq = None
        return self

    def compress(self, rank: int) -> Laplace:
        """Keep, of every K-FAC factor with more than ``rank`` rows, only its ``rank`` leading
        eigenpairs and replace the other eigenvalues by their mean (an isotropic remainder that
        preserves the trace). Storage per factor drops from ``d²`` to ``d·rank``; the marginal
        likelihood, samples and the GLM predictive use the compressed factors exactly as
        stored. Returns ``self``."""
        post = self.check_fitted()
        if not isinstance(post, KronPosterior):
            raise ValueError("compress() applies to hessian_structure='kron'.")
        if rank < 1:
            raise ValueError(f"rank={rank} must be at least 1.")
        self.posterior = post.compress(rank)
        return self

    def without_posterior(self, fit_error: str) -> Laplace:
        """This Laplace as the result of a fit that was not finite (``fit_error`` says what was
        not): the curvature and loss are dropped, the hyperparameters and the MAP (the model's
        parameters, ``mean``) stay, and every posterior method raises
        :class:`NonFiniteFitError` naming ``fit_error``. What ``marglik_training`` and the
        trainers return when their final fit is not finite. Returns ``self``."""
        self.posterior, self.loss, self.fit_error = None, None, fit_error
        self._mean = torch.cat([p.detach().reshape(-1) for p in self.params]).to(self.dtype)
        self._mean_sq = None
        return self

    def check_fitted(self) -> Posterior:
        """The posterior; a ``RuntimeError`` before :meth:`fit`, :class:`NonFiniteFitError` after
        a fit that was not finite."""
        self._check_finite_fit()
        if self.posterior is None or self.loss is None:
            raise RuntimeError("Call fit(train_loader) before using the Laplace approximation.")
        return self.posterior

    def _check_finite_fit(self) -> None:
        if self.fit_error is not None:
            raise NonFiniteFitError(
                f"This Laplace approximation has no posterior: its fit was not finite "
                f"({self.fit_error}). It holds the learned prior precision and noise and the MAP "
                "(the model's parameters, which predict without it). For a posterior, train "
                "again with a smaller learning rate, a larger prior_prec_init, float32 instead "
                "of float16/bfloat16, or backend='ggn' instead of 'ggn-mc'/'ef'; or fit a new "
                "Laplace(model, ...).fit(train_loader) at these parameters."
            )

    # ----------------------------------------------------------------- marginal likelihood
    def log_marginal_likelihood(
        self, prior_precision: Tensor | None = None, sigma_noise: Tensor | None = None
    ) -> Tensor:
        """The Laplace log marginal likelihood (a 0-d tensor), differentiable in both arguments.

        Arguments left out take the stored values; given ones are not stored.
        """
        post = self.check_fitted()
        prior = self._prior_of(prior_precision)
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        sigma = torch.as_tensor(sigma, dtype=self.dtype, device=self.device).reshape(())
        f = self.likelihood_factor(sigma)
        log_det_ratio = post.log_det(prior, f) - prior.log_det()
        return self._log_likelihood(sigma) - 0.5 * (log_det_ratio + self._scatter(prior))

    def _prior_of(self, prior_precision: Tensor | None) -> Prior:
        if prior_precision is None:
            return self._prior
        prec = torch.as_tensor(prior_precision, dtype=self.dtype, device=self.device)
        return Prior(prec, self.sizes)

    @property
    def log_likelihood(self) -> Tensor:
        """``log p(D | θ*)`` at the stored noise."""
        self.check_fitted()
        return self._log_likelihood(self.sigma_noise)

    def _log_likelihood(self, sigma: Tensor) -> Tensor:
        ll = -self.likelihood_factor(sigma) * self.loss
        if self.likelihood == Likelihood.REGRESSION:
            ll = ll - self.n_data * self.n_outputs * torch.log(sigma * math.sqrt(2 * math.pi))
        return ll

    def _scatter(self, prior: Prior) -> Tensor:
        """``(θ* − μ)ᵀ P (θ* − μ)``, with the squared norms of the fitted mean's offsets computed
        once per fit (the hyper-steps evaluate it a hundred times at the same mean)."""
        if not prior.isotropic_per_tensor:
            return prior.quadratic(list(torch.split(self.mean - self._prior_mean, self.sizes)))
        if self._mean_sq is None or self._mean_sq[0] is not self.mean:
            chunks = torch.split(self.mean - self._prior_mean, self.sizes)
            self._mean_sq = (self.mean, torch.stack([(c * c).sum() for c in chunks]))
        return prior.weighted(self._mean_sq[1])

    # ----------------------------------------------------------------- laplace-torch's terms
    @property
    def scatter(self) -> Tensor:
        """``(θ* − μ)ᵀ P (θ* − μ)`` at the stored prior precision."""
        self._check_finite_fit()
        return self._scatter(self._prior)

    @property
    def log_det_prior_precision(self) -> Tensor:
        """``log det P``."""
        return self._prior.log_det()

    @property
    def log_det_posterior_precision(self) -> Tensor:
        """``log det(f·H + P)``."""
        return self.check_fitted().log_det(self._prior, self.likelihood_factor())

    @property
    def log_det_ratio(self) -> Tensor:
        """``log det(f·H + P) − log det P``."""
        return self.log_det_posterior_precision - self.log_det_prior_precision

    @property
    def posterior_precision(self):
        """``f·H + P`` in the structure's form, as laplace-torch returns it: a dense matrix
        (``full``), a vector (``diag``), or for ``kron`` a :class:`KronPrecision` with
        laplace-torch's ``KronDecomposed`` methods ``to_matrix()``, ``diag()``, ``logdet()``."""
        post = self.check_fitted()
        f = self.likelihood_factor()
        if post.structure == HessianStructure.FULL:
            return post.precision_dense(self._prior, f)
        if post.structure == HessianStructure.DIAG:
            return torch.diagonal(post.precision_dense(self._prior, f)).clone()
        return KronPrecision(self, f)

    @property
    def H(self):
        """The curvature ``H`` in the structure's form (laplace-torch's attribute): a dense
        matrix (``full``), a vector (``diag``), the :class:`~hf_marglik.posterior.KronPosterior`
        (``kron``)."""
        post = self.check_fitted()
        if post.structure == HessianStructure.DIAG:
            return torch.diagonal(post.curvature_dense()).clone()
        if post.structure == HessianStructure.FULL:
            return post.curvature_dense()
        return post

    @property
    def posterior_covariance(self) -> Tensor:
        """``Σ = (f·H + P)⁻¹`` as a dense matrix (small models)."""
        return self.check_fitted().covariance_dense(self._prior, self.likelihood_factor())

    @property
    def posterior_variance(self) -> Tensor:
        """The diagonal of ``Σ`` (through the dense covariance: small models)."""
        return torch.diagonal(self.posterior_covariance).clone()

    def functional_variance(self, Js: Tensor) -> Tensor:
        """``J Σ Jᵀ`` per example: ``Js`` ``(batch, outputs, parameters)`` →
        ``(batch, outputs, outputs)``."""
        n, k = Js.shape[:2]
        chunks = list(torch.split(Js.reshape(n * k, -1).to(self.dtype), self.sizes, dim=1))
        return self.check_fitted().output_covariance(
            chunks, n, k, self._prior, self.likelihood_factor()
        )

    def functional_covariance(self, Js: Tensor) -> Tensor:
        """``J Σ Jᵀ`` over all outputs of the batch: ``(batch·outputs, batch·outputs)``."""
        n, k = Js.shape[:2]
        chunks = list(torch.split(Js.reshape(n * k, -1).to(self.dtype), self.sizes, dim=1))
        return self.check_fitted().quadratic(chunks, self._prior, self.likelihood_factor())

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """``n_samples`` draws ``θ ~ N(θ*, Σ)``, ``(n_samples, n_params)``."""
        return self.mean + torch.cat(self.sample_deltas(n_samples, generator), dim=1)

    def sample_deltas(
        self, n: int, generator: torch.Generator | None = None, prior: Prior | None = None
    ) -> list[Tensor]:
        """``n`` draws of ``θ − θ*``: one ``(n, numel)`` tensor per trainable tensor (each
        factorisation is computed once for all draws); ``prior`` (default ``self.prior``)."""
        prior = self._prior if prior is None else prior
        return self.check_fitted().sample(n, prior, self.likelihood_factor(), generator)

    def log_prob(self, value: Tensor, normalized: bool = True) -> Tensor:
        """``log N(value; θ*, Σ)`` (without the normalising constant if not ``normalized``)."""
        post = self.check_fitted()
        f = self.likelihood_factor()
        d = torch.as_tensor(value, dtype=self.dtype, device=self.device).reshape(-1) - self.mean
        chunks = list(torch.split(d.reshape(1, -1), self.sizes, dim=1))
        square = _precision_quadratic(post, chunks, self._prior, f)
        if not normalized:
            return -square / 2
        log_det = post.log_det(self._prior, f)
        return -self.n_params / 2 * math.log(2 * math.pi) + log_det / 2 - square / 2

    # ----------------------------------------------------------------- predictive
    def output_jacobians(self, x) -> tuple[Tensor, list[Tensor]]:
        """The outputs ``(n, k)`` on input ``x`` (a batch; its targets are ignored) and, per
        trainable tensor, the Jacobian of the outputs in it, ``(n·k, numel)`` example-major."""
        from .predictive import model_inputs

        return output_jacobians(
            self.model,
            model_inputs(self, x),
            self.params,
            self.sites,
            self.dict_key_x,
            self.dtype,
            MAX_GLM_OUTPUTS,
            self.batch_columns,
        )

    def __call__(
        self,
        x,
        pred_type="glm",
        joint: bool = False,
        link_approx="probit",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
    ):
        """Posterior predictive on a batch ``x`` (its targets, if any, are ignored), with
        laplace-torch's arguments: class probabilities ``(n, k)`` for categorical likelihoods;
        for regression the function's mean ``(n, k)`` and covariance ``(n, k, k)`` (``(n, k)``
        with ``diagonal_output``; with ``joint=True`` the mean ``(n·k,)`` and the covariance
        ``(n·k, n·k)`` over all outputs of the batch). ``pred_type``: ``"glm"`` (linearised,
        ``link_approx`` ``"probit"``, ``"mc"``, ``"bridge"`` or ``"bridge_norm"``;
        ``diagonal_output`` with ``"mc"`` samples the logits independently) or ``"nn"``
        (parameter samples); see
        :mod:`hf_marglik.predictive`. ``fitting`` is accepted for laplace-torch compatibility
        (it matters only for reward modelling there)."""
        from .predictive import predictive

        return predictive(
            self, x, pred_type, link_approx, n_samples, generator, joint, diagonal_output
        )

    def predictive_samples(
        self,
        x,
        pred_type="glm",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``(n_samples, n, k)`` draws of the predictive: softmax of logit samples for
        categorical likelihoods, function samples for regression."""
        from .predictive import predictive_samples

        return predictive_samples(self, x, pred_type, n_samples, diagonal_output, generator)

    def optimize_prior_precision(
        self,
        pred_type="glm",
        method="marglik",
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | Tensor = 1.0,
        prior_structure=None,
        val_loader=None,
        loss=None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx="probit",
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
        relative: bool = False,
    ) -> None:
        """Tune the prior precision after fitting, with laplace-torch's arguments: by the
        marginal likelihood (``method="marglik"``, Adam in log space) or by the predictive's
        loss on ``val_loader`` over a log grid (``method="gridsearch"``); see
        :func:`hf_marglik.tuning.optimize_prior_precision`."""
        from .tuning import optimize_prior_precision

        optimize_prior_precision(
            self,
            pred_type=pred_type,
            method=method,
            n_steps=n_steps,
            lr=lr,
            init_prior_prec=init_prior_prec,
            prior_structure=prior_structure,
            val_loader=val_loader,
            loss=loss,
            log_prior_prec_min=log_prior_prec_min,
            log_prior_prec_max=log_prior_prec_max,
            grid_size=grid_size,
            link_approx=link_approx,
            n_samples=n_samples,
            verbose=verbose,
            progress_bar=progress_bar,
            log_prior_prec_base=log_prior_prec_base,
            relative=relative,
        )

    # ----------------------------------------------------------------- inspection
    def kron_factors(self) -> list[tuple[Tensor, Tensor | None]]:
        """``(B, A)`` per trainable tensor (``A`` is None for biases), recomposed from the stored
        eigendecomposition (negative eigenvalues clipped)."""
        post = self.check_fitted()
        if not isinstance(post, KronPosterior):
            raise ValueError("kron_factors() needs hessian_structure='kron'.")
        return post.kron_factors()

    def curvature_dense(self) -> Tensor:
        """The curvature ``H`` (no prior, no ``f``) as a dense ``(P, P)`` matrix in the flat
        parameter order: for tests and small models."""
        return self.check_fitted().curvature_dense()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Hyperparameters, loss, MAP mean and the curvature in its stored (eigendecomposed for
        K-FAC) form; enough to evaluate the marginal likelihood without the data."""
        post = self.check_fitted()
        return {
            "likelihood": self.likelihood.value,
            "hessian_structure": self.hessian_structure.value,
            "backend": self.backend.value,
            "kfac_approx": self.kfac_approx.value,
            "param_names": list(self.param_names),
            "subset_of_weights": self.subset_of_weights.value,
            "prior_mean": (
                self._prior_mean.clone()
                if isinstance(self._prior_mean, Tensor)
                else torch.tensor(self._prior_mean)
            ),
            "predictive_subset_of_weights": self.predictive_subset_of_weights.value,
            "prior_precision": self.prior_precision.clone(),
            "predictive_prior_precision": (
                None
                if self.predictive_prior_precision is None
                else self.predictive_prior_precision.clone()
            ),
            "sigma_noise": self.sigma_noise.clone(),
            "temperature": self.temperature,
            "n_data": self.n_data,
            "n_outputs": self.n_outputs,
            "loss": self.loss.clone(),
            "mean": self.mean.clone(),
            "posterior": post.state_dict(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Load what :meth:`state_dict` gave (or hf_marglik 0.1's layout, ``kron`` / ``H``)."""
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
        self.predictive_prior_precision = sd.get("predictive_prior_precision")
        self.predictive_subset_of_weights = sd.get("predictive_subset_of_weights", "all")
        self.prior_mean = sd.get("prior_mean", 0.0)
        self.sigma_noise = sd["sigma_noise"]
        self.n_data, self.n_outputs = sd["n_data"], sd["n_outputs"]
        self.loss = sd["loss"].to(self.device, self.dtype)
        self._mean, self._mean_sq = sd["mean"].to(self.device, self.dtype), None
        self.posterior = posterior_from_state(
            self.hessian_structure, self.sizes, _to_device(sd.get("posterior", sd), self.device)
        )

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the posterior to ``folder`` (beside an adapter, say) as
        ``laplace_posterior.safetensors`` (the tensors of :meth:`state_dict`) and
        ``laplace_config.json`` (structure, likelihood, options, the parameters' names and
        shapes), each atomically; no pickle (:mod:`hf_marglik.pretrained`).
        :meth:`from_pretrained` loads it with the model alone."""
        from .pretrained import save_pretrained

        save_pretrained(self, folder)

    @classmethod
    def from_pretrained(
        cls, folder_or_hub_id: str | os.PathLike, model: nn.Module, revision: str | None = None
    ) -> Laplace:
        """A fitted :class:`Laplace` over ``model``'s trainable parameters from what
        :meth:`save_pretrained` wrote: a local folder, or else a Hugging Face Hub repository id
        (``owner/name``, at ``revision``; downloaded with ``huggingface_hub``). No data needed.
        The model must hold the trainable tensors the posterior was saved for: other names, or
        other shapes, are a ``ValueError`` that names the first difference."""
        from .pretrained import check_parameters, read, resolve, state_dict

        folder = resolve(folder_or_hub_id, revision)
        config, tensors = read(folder)
        lap = cls._unfitted(model, config)
        check_parameters(config, lap, folder)
        lap.load_state_dict(_to_device(state_dict(config, tensors), lap.device))
        return lap

    @classmethod
    def _unfitted(cls, model: nn.Module, saved: dict) -> Laplace:
        """A :class:`Laplace` over ``model`` with the constructor settings of a saved posterior
        (``laplace_config.json`` or an old ``.pt`` state), to load its state into."""
        return cls(
            model,
            saved["likelihood"],
            hessian_structure=saved["hessian_structure"],
            backend=saved["backend"],
            kfac_approx=saved["kfac_approx"],
            temperature=saved["temperature"],
            subset_of_weights=saved.get("subset_of_weights", "all"),
            **saved.get("options", {}),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Deprecated (a pickle-based ``.pt`` file): use :meth:`save_pretrained`. Writes the
        ``state_dict`` and the constructor options to ``path``, atomically."""
        from .pretrained import options

        warnings.warn(_PICKLE_NOTICE.format(what="Laplace.save writes"), FutureWarning, 2)
        save_torch({**self.state_dict(), "options": options(self)}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module) -> Laplace:
        """A fitted :class:`Laplace` over ``model``'s trainable parameters from a ``.pt`` file of
        :meth:`save` (deprecated: use :meth:`from_pretrained`; ``scripts/convert_posterior.py``
        converts a run's file); no data needed. The model must hold the same trainable
        tensors."""
        warnings.warn(_PICKLE_NOTICE.format(what="Laplace.load reads"), FutureWarning, 2)
        sd = torch.load(path, map_location="cpu", weights_only=True)
        lap = cls._unfitted(model, sd)
        lap.load_state_dict(_to_device(sd, lap.device))
        return lap


_PICKLE_NOTICE = (
    "{what} the pickle-based .pt posterior, which is deprecated: use lap.save_pretrained(folder) "
    "and Laplace.from_pretrained(folder, model) (safetensors + JSON); "
    "scripts/convert_posterior.py converts a run's laplace_posterior.pt."
)


class KronPrecision:
    """The K-FAC posterior precision ``f·B⊗A + P`` of a :class:`Laplace`, with laplace-torch's
    ``KronDecomposed`` methods (``to_matrix``, ``diag``, ``logdet``)."""

    def __init__(self, lap: Laplace, f: Tensor):
        self._post, self._prior, self._f = lap.posterior, lap.prior, f

    def to_matrix(self) -> Tensor:
        return self._post.precision_dense(self._prior, self._f)

    def diag(self) -> Tensor:
        blocks = [torch.diagonal(self._post.dense_block(i)) for i in range(len(self._post.blocks))]
        return self._f * torch.cat(blocks) + self._prior.per_parameter()

    def logdet(self) -> Tensor:
        return self._post.log_det(self._prior, self._f)


def _precision_quadratic(post: Posterior, chunks: list[Tensor], prior: Prior, f: Tensor) -> Tensor:
    """``dᵀ (f·H + P) d`` for ``d`` given per tensor as ``(1, numel)`` chunks."""
    d = torch.cat(chunks, dim=1).reshape(-1)
    if post.structure == HessianStructure.KRON and prior.isotropic_per_tensor:
        total = d.new_zeros(())
        for i, (c, p) in enumerate(zip(chunks, prior.per_tensor())):
            B, A = post.block_factors(i)
            X = c.reshape(B.side) if A is None else c.reshape(B.side, A.side)
            HX = B.dense() @ X if A is None else B.dense() @ X @ A.dense()
            total = total + f * (X * HX).sum() + p[0] * (X * X).sum()
        return total
    return d @ (post.precision_dense(prior, f) @ d)


def _to_device(sd: dict, device) -> dict:
    def move(x):
        if isinstance(x, Tensor):
            return x.to(device)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(move(v) for v in x)
        return x

    return move(sd)


def _to_device(obj, device: torch.device, memo: dict | None = None):
    """``obj`` (a posterior's state: tensors in dicts, lists and tuples) with every tensor on
    ``device``, a tensor held in several places moved once (hf_marglik 0.1's layout shares
    factors by identity): a posterior saved from a GPU run and read with
    ``map_location="cpu"`` goes back to the model's device."""
    memo = {} if memo is None else memo
    if isinstance(obj, Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, dict):
        return {k: _to_device(v, device, memo) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_device(v, device, memo) for v in obj)
    return obj
