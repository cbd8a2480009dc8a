"""The hyperparameters of marginal-likelihood training and their optimiser.

Algorithm 1 of Immer et al. (ICML 2021), as in laplace-torch's ``marglik_training``: the log
prior precision ``log δ`` (one value, one per trainable tensor, or one per parameter) and, for
regression, the log observation noise ``log σ`` are optimised with Adam on the negative Laplace
log marginal likelihood ``−log p(D | δ, σ)`` of a fitted :class:`~hf_marglik.Laplace`, while the
network is trained on the log joint. The training loss carries the prior term

    ½ θᵀPθ / c,   c = T (categorical likelihoods)  or  c = T / (2σ²) (regression),

added to a likelihood term summed over the data (cross-entropy; squared error for regression)
and divided by the number of data points, which is laplace-torch's scaling (``crit_factor``).

:func:`count_data_points` counts the data points ``N`` that the likelihood sums over (sequences
for classification and regression, target tokens for causal LM) without calling the model.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from .batches import split_batch, targets_for
from .options import Likelihood, PriorStructure, coerce
from .prior import Prior


def check_settings(
    *,
    lr_hyp: float,
    n_hypersteps: int,
    marglik_frequency: int,
    n_epochs_burnin: int,
    prior_prec_init: float,
    sigma_noise_init: float,
    temperature: float,
    enable_backprop: bool = False,
) -> None:
    """Raise a ``ValueError`` that names the field and the fix for an invalid setting."""
    if enable_backprop:
        raise NotImplementedError(
            "enable_backprop=True (a marginal likelihood differentiable in the model parameters) "
            "is not supported: hf_marglik's curvature is detached. Leave it False."
        )
    checks = [
        ("lr_hyp", lr_hyp, lr_hyp > 0, "a positive Adam step size, e.g. 0.1"),
        ("n_hypersteps", n_hypersteps, n_hypersteps >= 1, "an integer >= 1, e.g. 10"),
        (
            "marglik_frequency",
            marglik_frequency,
            marglik_frequency >= 1,
            "an integer >= 1 (1: after every epoch)",
        ),
        ("n_epochs_burnin", n_epochs_burnin, n_epochs_burnin >= 0, "an integer >= 0"),
        ("prior_prec_init", prior_prec_init, prior_prec_init > 0, "a positive float, e.g. 1.0"),
        ("sigma_noise_init", sigma_noise_init, sigma_noise_init > 0, "a positive float"),
        ("temperature", temperature, temperature > 0, "a positive float (1.0: no tempering)"),
    ]
    for name, value, ok, fix in checks:
        if not (ok and math.isfinite(value)):
            raise ValueError(f"{name}={value!r} is invalid; set {name} to {fix}.")


def n_targets(y: Tensor, likelihood: Likelihood, attention_mask: Tensor | None = None) -> int:
    """The number of data points in targets ``y``, by the rule of :func:`batches.targets_for`
    (-100 and padding are not data), without the model's logits."""
    if y.numel() == 0:
        return 0
    if likelihood == Likelihood.REGRESSION:
        shape = tuple(y.shape) if y.ndim == 2 else (y.shape[0], 1)
    else:
        shape = (*y.shape, int(y.max().clamp_min(0)) + 1)
    dummy = torch.zeros((), device=y.device).expand(shape)
    return targets_for(dummy, y, likelihood, attention_mask).n_data


def batch_targets(batch, likelihood: Likelihood, dict_key_x: str, dict_key_y: str) -> int:
    """The number of data points in one batch (see :func:`n_targets`)."""
    inputs, y = split_batch(batch, dict_key_x, dict_key_y)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return n_targets(y, likelihood, mask)


def count_data_points(
    loader: Iterable, likelihood: Likelihood, dict_key_x: str, dict_key_y: str
) -> int:
    """``N``: the data points that the likelihood sums over, in one pass over the targets of
    ``loader`` (no model call). The global RNG state is left as it was, so counting does not
    change a shuffled loader's order or any later random draw."""
    with torch.random.fork_rng(devices=[]):
        n = sum(batch_targets(b, likelihood, dict_key_x, dict_key_y) for b in loader)
    if n == 0:
        raise ValueError(
            "The training data has no data points: every target is -100 or padding. Check "
            "dict_key_y and the data collator."
        )
    return int(n)


def likelihood_scale(likelihood: Likelihood) -> float:
    """Factor from :func:`batches.nll_sum` to the summed training criterion: 1 for cross-entropy,
    2 for regression (``nll_sum`` is ``½‖f − y‖²``; laplace-torch trains on the squared error)."""
    return 2.0 if likelihood == Likelihood.REGRESSION else 1.0


class HyperOptimizer:
    """Log prior precision and log observation noise, with one Adam whose state persists across
    marginal-likelihood steps.

    Args:
        sizes: the number of elements of each trainable tensor (``named_parameters`` order).
        likelihood: ``"classification"``, ``"regression"`` or ``"causal_lm"``.
        prior_structure: ``"scalar"`` (one precision), ``"layerwise"`` (one per tensor) or
            ``"diag"`` (one per parameter).
        prior_prec_init: the initial precision; the parameter starts at
            ``log(temperature * prior_prec_init)`` as in laplace-torch.
        sigma_noise_init: the initial observation noise (regression).
        temperature: the likelihood temperature ``T``.
        fix_sigma_noise: keep ``σ = sigma_noise_init`` (regression); ``σ`` is 1 and not learned
            for categorical likelihoods.
        lr_hyp: Adam's step size.
        tie_groups: for a ``"layerwise"`` prior, the group of each tensor (integers from 0):
            the tensors of one group share one learned precision (e.g. ``lora_A`` and
            ``lora_B`` of one adapter, :func:`~hf_marglik.lora.lora_groups`). The precision the
            rest of the library sees (:attr:`prior_precision`, the :class:`Laplace`'s) is still
            one value per tensor; only the hyper-optimiser's parameters are tied. None: untied.
        max_log_step: a trust region: one update (:meth:`step`) moves each ``log δ`` by at most
            this much from where the update started (projected Adam). None: unbounded
            (laplace-torch's).
    """

    def __init__(
        self,
        sizes: list[int],
        likelihood: Likelihood | str,
        prior_structure: PriorStructure | str = PriorStructure.LAYERWISE,
        prior_prec_init: float = 1.0,
        sigma_noise_init: float = 1.0,
        temperature: float = 1.0,
        fix_sigma_noise: bool = False,
        lr_hyp: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        tie_groups: list[int] | None = None,
        max_log_step: float | None = None,
    ):
        check_settings(
            lr_hyp=lr_hyp,
            n_hypersteps=1,
            marglik_frequency=1,
            n_epochs_burnin=0,
            prior_prec_init=prior_prec_init,
            sigma_noise_init=sigma_noise_init,
            temperature=temperature,
        )
        self.likelihood = coerce(Likelihood, likelihood, "likelihood")
        self.prior_structure = coerce(PriorStructure, prior_structure, "prior_structure")
        self.temperature = float(temperature)
        self.sigma_noise_init = float(sigma_noise_init)
        self.sizes = list(sizes)
        n_prec = Prior.size(self.prior_structure, self.sizes)
        self.tie_groups = None if tie_groups is None else [int(g) for g in tie_groups]
        if self.tie_groups is not None:
            n_prec = _check_groups(self.tie_groups, self.sizes, self.prior_structure)
            self._group_index = torch.tensor(self.tie_groups, device=device)
        if max_log_step is not None and not (max_log_step > 0 and math.isfinite(max_log_step)):
            raise ValueError(
                f"max_log_step={max_log_step!r} is invalid; set it to a positive float (the "
                "largest change of log prior precision per update, e.g. 1.0) or None."
            )
        self.max_log_step = max_log_step
        dtype = torch.get_default_dtype() if dtype is None else dtype
        init = math.log(temperature * prior_prec_init)
        self.log_prior_prec = torch.full((n_prec,), init, device=device, dtype=dtype)
        self.log_prior_prec.requires_grad_(True)
        hypers = [self.log_prior_prec]
        self.log_sigma_noise: Tensor | None = None
        if self.likelihood == Likelihood.REGRESSION and not fix_sigma_noise:
            self.log_sigma_noise = torch.full(
                (1,), math.log(sigma_noise_init), device=device, dtype=dtype
            )
            self.log_sigma_noise.requires_grad_(True)
            hypers.append(self.log_sigma_noise)
        self.optimizer = torch.optim.Adam(hypers, lr=lr_hyp)
        self.evaluated_prior_precision = self.prior_precision
        self.evaluated_sigma_noise = self.sigma_noise
        self.prior_mean: Tensor | None = None
        """The prior's mean ``μ`` as one flat vector over the trainable tensors; None: zero."""

    @property
    def learns_sigma(self) -> bool:
        return self.log_sigma_noise is not None

    @property
    def prior_precision(self) -> Tensor:
        """``δ = exp(log δ)``, detached (with ``tie_groups``: one value per tensor)."""
        return self._expand(self.log_prior_prec.detach().exp())

    def _expand(self, prec: Tensor) -> Tensor:
        """Tied precisions (one per group) as one per tensor; others as they are."""
        return prec if self.tie_groups is None else prec[self._group_index]

    def decay_(self, params: list[Tensor], optimizer, n_data: int) -> None:
        """The decoupled application of the prior (:class:`~hf_marglik.PriorApplication`):
        ``θ ← θ − lr·(δ/(N·c))·(θ − μ)`` in place, per tensor at the learning rate of its
        parameter group in ``optimizer`` (0 for a tensor the optimizer does not hold)
        (``δ`` per tensor or per parameter, ``c`` the crit factor, ``μ`` the prior's mean).
        With SGD this is the gradient step of the loss's prior term; with Adam it bypasses the
        preconditioner, as AdamW's weight decay does."""
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        lrs = [float(lr_of.get(id(p), 0.0)) for p in params]
        prior = Prior(self.prior_precision, self.sizes)
        mus = (
            [None] * len(params)
            if self.prior_mean is None
            else torch.split(self.prior_mean, self.sizes)
        )
        scale = 1.0 / (n_data * self.crit_factor)
        with torch.no_grad():
            for p, lr, prec, mu in zip(params, lrs, prior.per_tensor(), mus):
                rate = (lr * scale) * prec.to(p.dtype).reshape(-1 if prec.numel() == 1 else p.shape)
                if prec.numel() == 1:
                    rate = rate.reshape(())
                centred = p if mu is None else p - mu.to(p.dtype).reshape(p.shape)
                p.sub_(rate * centred)

    @property
    def sigma_noise(self) -> Tensor:
        """``σ``, detached: learned (regression), ``sigma_noise_init`` (fixed), 1 (categorical)."""
        if self.log_sigma_noise is not None:
            return self.log_sigma_noise.detach().exp().reshape(())
        value = self.sigma_noise_init if self.likelihood == Likelihood.REGRESSION else 1.0
        return torch.tensor(
            value, dtype=self.log_prior_prec.dtype, device=self.log_prior_prec.device
        )

    @property
    def crit_factor(self) -> float:
        """laplace-torch's ``crit_factor``: ``T``, or ``T / (2σ²)`` for regression."""
        if self.likelihood == Likelihood.REGRESSION:
            return self.temperature / (2 * float(self.sigma_noise) ** 2)
        return self.temperature

    @property
    def likelihood_scale(self) -> float:
        """:func:`likelihood_scale` of this likelihood."""
        return likelihood_scale(self.likelihood)

    @property
    def prior(self) -> Prior:
        """The current prior (detached)."""
        return Prior(self.prior_precision, self.sizes)

    def prior_term(self, params: list[Tensor]) -> Tensor:
        """``½ (θ − μ)ᵀP(θ − μ) / crit_factor`` at the current precision, differentiable in
        ``params`` (``μ``: :attr:`prior_mean`, 0 unless set)."""
        prior = Prior(self.prior_precision.to(params[0].dtype), self.sizes)
        if self.prior_mean is not None:
            mus = torch.split(self.prior_mean.to(params[0].dtype), self.sizes)
            params = [p - m.reshape(p.shape) for p, m in zip(params, mus)]
        return 0.5 * prior.quadratic(params) / self.crit_factor

    def centre_prior_at(self, params: list[Tensor]) -> None:
        """Centre the prior at the current values of ``params`` (``prior_mean="init"``: the
        parameters before training); saved in :meth:`state_dict`."""
        self.prior_mean = torch.cat([p.detach().reshape(-1) for p in params]).clone()

    def step(self, lap, n_hypersteps: int) -> list[float]:
        """Take ``n_hypersteps`` Adam steps on ``−lap.log_marginal_likelihood(δ, σ)``.

        Returns the negative log marginal likelihoods, one per step, each evaluated before its
        step; ``evaluated_prior_precision`` / ``evaluated_sigma_noise`` hold the values of the
        last one. A non-finite value or gradient, or a step that would make a precision or the
        noise 0 or infinite, is skipped with a warning and the remaining steps are dropped; the
        hyperparameters keep their previous values.
        """
        values: list[float] = []
        start = self.log_prior_prec.detach().clone()
        for _ in range(n_hypersteps):
            self.optimizer.zero_grad()
            prec = self._expand(self.log_prior_prec.exp())
            sigma = self.log_sigma_noise.exp().reshape(()) if self.learns_sigma else None
            try:
                neg = -lap.log_marginal_likelihood(prec, sigma)
            except (RuntimeError, ValueError) as err:  # e.g. a failed Cholesky factorisation
                self._skip(f"the log marginal likelihood could not be evaluated ({err})")
                break
            if not torch.isfinite(neg):
                self._skip(f"the log marginal likelihood is {-neg.item()}")
                break
            neg.backward()
            if not all(torch.isfinite(h.grad).all() for h in self._hypers() if h.grad is not None):
                self._skip("its gradient is not finite")
                values.append(neg.item())
                self._record(prec, sigma)
                break
            saved = self._snapshot()
            self.optimizer.step()
            if self.max_log_step is not None:  # the trust region: a projected step
                with torch.no_grad():
                    r = self.max_log_step
                    self.log_prior_prec.copy_(
                        torch.minimum(torch.maximum(self.log_prior_prec, start - r), start + r)
                    )
            values.append(neg.item())
            self._record(prec, sigma)
            if not self._valid():
                self._restore(saved)
                self._record(prec, sigma)  # the values just evaluated are the current ones
                self._skip("the step would make a precision or the noise 0 or infinite")
                break
        self.optimizer.zero_grad()
        return values

    def _hypers(self) -> list[Tensor]:
        return [self.log_prior_prec] + ([self.log_sigma_noise] if self.learns_sigma else [])

    def _record(self, prec: Tensor, sigma: Tensor | None) -> None:
        self.evaluated_prior_precision = prec.detach().clone()
        self.evaluated_sigma_noise = self.sigma_noise if sigma is None else sigma.detach().clone()

    def _snapshot(self) -> tuple[list[tuple[Tensor, Tensor]], set]:
        """Copies of the hyperparameters and Adam's state tensors (cheap: one small clone each,
        where ``state_dict`` deep-copies), to undo a step."""
        tensors = list(self._hypers())
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        return [(t, t.detach().clone()) for t in tensors], set(self.optimizer.state)

    def _restore(self, snapshot: tuple[list[tuple[Tensor, Tensor]], set]) -> None:
        pairs, had_state = snapshot
        with torch.no_grad():
            for t, saved in pairs:
                t.copy_(saved)
        for p in [p for p in self.optimizer.state if p not in had_state]:
            del self.optimizer.state[p]  # the undone step was the first: no Adam state before

    def _valid(self) -> bool:
        for h in self._hypers():
            v = h.detach().exp()
            if not (torch.isfinite(v).all() and (v > 0).all()):
                return False
        return True

    @staticmethod
    def _skip(reason: str) -> None:
        warnings.warn(
            f"Skipping the hyperparameter update: {reason}. The prior precision and noise keep "
            "their previous values. Try a smaller lr_hyp or a larger prior_prec_init.",
            RuntimeWarning,
            stacklevel=3,
        )

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: the parameters, Adam's state, the values at the
        last evaluation."""
        return {
            "log_prior_prec": self.log_prior_prec.detach().clone(),
            "log_sigma_noise": None
            if self.log_sigma_noise is None
            else self.log_sigma_noise.detach().clone(),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "evaluated_prior_precision": self.evaluated_prior_precision.clone(),
            "evaluated_sigma_noise": self.evaluated_sigma_noise.clone(),
            "prior_mean": None if self.prior_mean is None else self.prior_mean.clone(),
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd["log_prior_prec"].shape != self.log_prior_prec.shape:
            raise ValueError(
                f"The saved prior precision has shape {tuple(sd['log_prior_prec'].shape)}, this "
                f"run's has {tuple(self.log_prior_prec.shape)}: was prior_structure or the set of "
                "trainable parameters changed?"
            )
        if (sd["log_sigma_noise"] is None) != (self.log_sigma_noise is None):
            raise ValueError("The saved state and this run disagree on learning sigma_noise.")
        with torch.no_grad():
            self.log_prior_prec.copy_(sd["log_prior_prec"])
            if self.log_sigma_noise is not None:
                self.log_sigma_noise.copy_(sd["log_sigma_noise"])
        self.optimizer.load_state_dict(copy.deepcopy(sd["optimizer"]))
        device, dtype = self.log_prior_prec.device, self.log_prior_prec.dtype
        self.evaluated_prior_precision = sd["evaluated_prior_precision"].to(device, dtype)
        self.evaluated_sigma_noise = sd["evaluated_sigma_noise"].to(device, dtype)
        mu = sd.get("prior_mean")
        self.prior_mean = None if mu is None else mu.to(device)


def _check_groups(groups: list[int], sizes: list[int], structure: PriorStructure) -> int:
    """The number of tied precisions of ``groups``; a ``ValueError`` for an invalid grouping."""
    if structure != PriorStructure.LAYERWISE:
        raise ValueError(
            f"Tied precisions (tie_groups) group the tensors of a layerwise prior; "
            f"prior_structure={structure.value!r}. Set prior_structure='layerwise'."
        )
    if len(groups) != len(sizes):
        raise ValueError(f"tie_groups has {len(groups)} entries for {len(sizes)} tensors.")
    n = max(groups) + 1 if groups else 0
    if min(groups, default=0) < 0 or sorted(set(groups)) != list(range(n)):
        raise ValueError(f"tie_groups must number the groups 0, 1, ..., n-1; got {groups}.")
    return n
