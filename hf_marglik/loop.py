"""Algorithm 1 of Immer et al. (ICML 2021), framework-free: the state that marginal-likelihood
training keeps between network updates, and the step that changes it.

:class:`MargLikLoop` holds the hyper-optimiser (log prior precision, log noise, Adam), the
histories (negative log marginal likelihoods per hyper-step, update steps, skipped steps, epoch
losses) and the best update seen. ``update(step, fit)`` fits a Laplace approximation through the
caller's ``fit`` closure and takes the hyper-steps; ``finish(step, fit)`` restores the best
parameters and returns the Laplace approximation at the final parameters, reusing a fit made
there. :func:`~hf_marglik.marglik.marglik_training`, :class:`~hf_marglik.MargLikTrainer` and
:class:`~hf_marglik.MargLikSFTTrainer` are thin adapters around it: they own the data, the
network's training and the logs; the loop owns everything Algorithm 1 decides.

Numerical faults are handled here once for all adapters: a fit whose loss or curvature is not
finite (a diverged model, a float16 overflow, a failed eigendecomposition) and an update whose
first hyper-step the hyper-optimiser rejects are skipped with a ``RuntimeWarning``; the
hyperparameters, the best model and the last fit stay as they were. A final fit that is not
finite gives, with a warning, a :class:`~hf_marglik.Laplace` without a posterior
(:meth:`~hf_marglik.Laplace.without_posterior`): the learned hyperparameters and the MAP, and
posterior methods that raise an error naming the fault.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .hyper import HyperOptimizer
from .laplace import Laplace
from .options import Likelihood

Fit = Callable[[Tensor, Tensor], Laplace]
"""``fit(prior_precision, sigma_noise)``: a new :class:`Laplace` fitted at the current parameters
with these hyperparameters (the adapter knows the data and the curvature settings)."""
New = Callable[[Tensor, Tensor], Laplace]
"""``new(prior_precision, sigma_noise)``: the same :class:`Laplace`, not fitted."""


@dataclass
class Best:
    """The update with the lowest negative log marginal likelihood so far."""

    params: list[Tensor]
    prior_precision: Tensor
    sigma_noise: Tensor
    step: int
    value: float  # −log p(D) at the last hyper-step of that update

    def state_dict(self) -> dict:
        return {
            "params": [p.detach().cpu() for p in self.params],
            "prior_precision": self.prior_precision,
            "sigma_noise": self.sigma_noise,
            "step": self.step,
            "value": self.value,
        }

    @classmethod
    def from_state(cls, sd: dict, device) -> Best:
        return cls(
            [p.to(device) for p in sd["params"]],
            sd["prior_precision"].to(device),
            sd["sigma_noise"].to(device),
            int(sd["step"]),
            float(sd["value"]),
        )


def checked_fit(
    fit: Fit, prior_precision: Tensor, sigma_noise: Tensor
) -> tuple[Laplace | None, str]:
    """``fit(...)`` and a description of what is not finite in it ('' when all is finite). The
    check is the fit's loss, then the log marginal likelihood at the given hyperparameters:
    finite exactly when the loss and every curvature eigenvalue are finite. Factors with NaN or
    Inf are never decomposed (:mod:`hf_marglik.factors`); a decomposition that fails anyway
    (``eigh`` raises on some platforms and returns NaN on others) counts as not finite either
    way."""
    try:
        lap = fit(prior_precision, sigma_noise)
    except torch.linalg.LinAlgError as err:
        return None, f"its decomposition failed: {err}"
    if lap.loss is not None and not torch.isfinite(lap.loss):
        return lap, f"the training loss over the fit's data is {float(lap.loss)}"
    try:
        value = lap.log_marginal_likelihood()
    except torch.linalg.LinAlgError as err:
        return lap, f"its decomposition failed: {err}"
    if not torch.isfinite(value):
        return lap, f"the curvature holds NaN or Inf; log marginal likelihood {float(value)}"
    return lap, ""


class MargLikLoop:
    """The marginal-likelihood side of Algorithm 1 over the trainable tensors ``params``.

    Args:
        params: the trainable tensors (the network's side; copied for the best update).
        hyper: the hyper-optimiser (prior precision, noise, Adam state).
        n_hypersteps: hyper-steps per update.
        restore_best: ``finish`` restores the parameters and hyperparameters of the best update
            (laplace-torch's behaviour); otherwise the last ones are kept.
        new_laplace: builds the adapter's :class:`Laplace` without fitting it: what ``finish``
            returns (without a posterior) when the final fit raised.
    """

    def __init__(
        self,
        params: list[Tensor],
        hyper: HyperOptimizer,
        n_hypersteps: int,
        restore_best: bool = True,
        *,
        new_laplace: New,
    ):
        self.params, self.hyper, self.new_laplace = params, hyper, new_laplace
        self.n_hypersteps, self.restore_best = n_hypersteps, restore_best
        self.margliks: list[float] = []
        """Negative log marginal likelihoods, one per hyper-step (laplace-torch's ``margliks``)."""
        self.losses: list[float] = []
        """The mean training loss (log joint per data point) of every completed epoch."""
        self.update_steps: list[int] = []
        self.skipped_steps: list[int] = []
        self.best: Best | None = None
        self.laplace: Laplace | None = None
        """The last accepted fit during training; after :meth:`finish`, the final one."""
        self.final: tuple[Tensor, Tensor] | None = None
        """``(prior_precision, sigma_noise)`` chosen by :meth:`finish`."""
        self._fits: dict[int, Laplace] = {}  # step -> fit (the last and the best update's)

    @property
    def prior_precision(self) -> Tensor:
        """The final prior precision after :meth:`finish`, else the current one."""
        return self.hyper.prior_precision if self.final is None else self.final[0]

    @property
    def sigma_noise(self) -> Tensor:
        return self.hyper.sigma_noise if self.final is None else self.final[1]

    @property
    def best_marglik(self) -> float | None:
        """The best log marginal likelihood seen (None before any accepted update)."""
        return None if self.best is None else -self.best.value

    # ------------------------------------------------------------------ one update
    def update(self, step: int, fit: Fit) -> Laplace | None:
        """Fit at the current parameters and take ``n_hypersteps`` on ``−log p(D)``; return the
        fit, or None when the update was skipped (recorded in ``skipped_steps``)."""
        hyper = self.hyper
        lap, fault = checked_fit(fit, hyper.prior_precision, hyper.sigma_noise)
        if fault:
            warnings.warn(
                f"Skipping the hyperparameter update at step {step}: the curvature fit is not "
                f"finite ({fault}); a diverged model or a float16 overflow? The prior precision "
                "and noise keep their previous values and training goes on.",
                RuntimeWarning,
                stacklevel=3,
            )
            values = []
        else:
            values = hyper.step(lap, self.n_hypersteps)  # warns itself when it skips
        if not values:
            self.skipped_steps.append(step)
            return None
        self.laplace = lap
        self.margliks.extend(values)
        self.update_steps.append(step)
        if self.best is None or values[-1] < self.best.value:
            self.best = Best(
                [p.detach().clone() for p in self.params],
                hyper.evaluated_prior_precision.clone(),
                hyper.evaluated_sigma_noise.clone(),
                step,
                values[-1],
            )
        keep = {step, self.best.step}
        self._fits = {s: f for s, f in {**self._fits, step: lap}.items() if s in keep}
        return lap

    # ------------------------------------------------------------------ the end
    def finish(self, step: int, fit: Fit) -> Laplace:
        """Restore the best update's parameters (``restore_best``) and return the Laplace
        approximation at the final parameters with the final hyperparameters. A fit made at
        exactly those parameters (the best update's, or the last update's when training ended
        with it) is reused; otherwise (no update, steps after the last update, a resumed run
        whose best came before the checkpoint) ``fit`` is called. A final fit that is not
        finite gives, with a warning, the Laplace :meth:`~hf_marglik.Laplace.without_posterior`:
        the final hyperparameters and the MAP, its posterior methods raising
        :class:`~hf_marglik.laplace.NonFiniteFitError` with ``fault`` in ``fit_error``."""
        prec, sigma = self.hyper.prior_precision, self.hyper.sigma_noise
        if self.restore_best and self.best is not None:
            with torch.no_grad():
                for p, b in zip(self.params, self.best.params):
                    p.copy_(b)
            prec, sigma, step = self.best.prior_precision, self.best.sigma_noise, self.best.step
        self.final = (prec, sigma)
        lap = self._fits.get(step)
        if lap is None:
            lap, fault = checked_fit(fit, prec, sigma)
            if fault:
                warnings.warn(
                    f"The final Laplace approximation is not finite ({fault}): the Laplace "
                    "returned has no posterior (its posterior methods raise); it holds the "
                    "learned hyperparameters and the MAP.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                if lap is None:  # the fit raised
                    lap = self.new_laplace(prec, sigma)
                lap.prior_precision = prec
                if self.hyper.likelihood == Likelihood.REGRESSION:
                    lap.sigma_noise = sigma
                lap.without_posterior(f"final fit at step {step}: {fault}")
        else:
            lap.prior_precision = prec
            if self.hyper.likelihood == Likelihood.REGRESSION:
                lap.sigma_noise = sigma
        self.laplace, self._fits = lap, {}
        return lap

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue exactly (fits are not kept: a resumed run refits)."""
        return {
            "hyper": self.hyper.state_dict(),
            "best": None if self.best is None else self.best.state_dict(),
            "margliks": list(self.margliks),
            "losses": list(self.losses),
            "update_steps": list(self.update_steps),
            "skipped_steps": list(self.skipped_steps),
        }

    def load_state_dict(self, sd: dict) -> None:
        device = self.params[0].device
        self.hyper.load_state_dict(sd["hyper"])
        self.best = None if sd["best"] is None else Best.from_state(sd["best"], device)
        self.margliks, self.losses = list(sd["margliks"]), list(sd["losses"])
        self.update_steps = list(sd["update_steps"])
        self.skipped_steps = list(sd["skipped_steps"])
        self.laplace, self._fits, self.final = None, {}, None
