"""``marglik_training``: laplace-torch's function, with its signature, defaults and returns."""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Mapping

import torch
import tqdm
from torch import nn
from torch.utils.data import DataLoader

from .batches import call_model, nll_sum, split_batch, targets_for, to_device
from .hyper import HyperOptimizer, check_settings, count_data_points
from .laplace import Laplace
from .loop import MargLikLoop
from .lora import lora_groups
from .online import OnlineCurvature, interval_for_budget
from .options import (
    Backend,
    CurvatureSource,
    HessianStructure,
    Likelihood,
    PriorApplication,
    PriorStructure,
    coerce,
)
from .prior import trainable_parameters

logger = logging.getLogger(__name__)


def backend_name(backend) -> Backend:
    """A :class:`Backend` from a name, or from a laplace-torch curvature class (or a
    ``functools.partial`` of one), by class name: ``*GGN`` → ``"ggn"`` (``"ggn-mc"`` when built
    with ``stochastic=True``), ``*EF`` → ``"ef"``. laplace is not imported."""
    if isinstance(backend, (str, Backend)):
        return coerce(Backend, backend, "backend")
    stochastic = False
    if isinstance(backend, functools.partial):
        stochastic = bool(backend.keywords.get("stochastic", False))
        backend = backend.func
    name = backend.__name__ if isinstance(backend, type) else type(backend).__name__
    stochastic = stochastic or bool(getattr(backend, "stochastic", False) is True)
    if name.endswith("GGN"):
        return Backend.GGN_MC if stochastic else Backend.GGN
    if name.endswith("EF"):
        return Backend.EF
    raise ValueError(
        f"backend={name} is not supported: hf_marglik computes the GGN ('ggn', 'ggn-mc') or the "
        "empirical Fisher ('ef'). Pass one of these names, or a laplace-torch *GGN / *EF class."
    )


def marglik_training(
    model: nn.Module,
    train_loader: DataLoader,
    likelihood: Likelihood | str = "classification",
    hessian_structure: HessianStructure | str = "kron",
    backend="ggn",
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_kwargs: dict | None = None,
    scheduler_cls: type | None = None,
    scheduler_kwargs: dict | None = None,
    n_epochs: int = 300,
    lr_hyp: float = 1e-1,
    prior_structure: PriorStructure | str = "layerwise",
    n_epochs_burnin: int = 0,
    n_hypersteps: int = 10,
    marglik_frequency: int = 1,
    prior_prec_init: float = 1.0,
    sigma_noise_init: float = 1.0,
    temperature: float = 1.0,
    fix_sigma_noise: bool = False,
    progress_bar: bool = False,
    enable_backprop: bool = False,
    dict_key_x: str = "input_ids",
    dict_key_y: str = "labels",
    *,
    marglik_curvature: CurvatureSource | str = "fit",
    marglik_budget: float = 0.25,
    prior_application: PriorApplication | str = "loss",
    tie_lora_prior: bool = False,
    max_log_prior_step: float | None = None,
) -> tuple[Laplace, nn.Module, list[float], list[float]]:
    """Marginal-likelihood training (Algorithm 1 of Immer et al., ICML 2021).

    The network is trained on the log joint, per batch
    ``(Σ_i ℓ_i + n_b · ½θᵀPθ / (N·c)) / n_b`` (``ℓ`` cross-entropy, or squared error for
    regression; ``c = T`` or ``T / (2σ²)``; ``N`` the data points); after every
    ``marglik_frequency``-th epoch once ``epoch >= n_epochs_burnin`` a Laplace approximation is
    fit on ``train_loader`` and ``n_hypersteps`` Adam steps (step size ``lr_hyp``, state kept
    across estimates) are taken on ``−log p(D | P, σ)`` in log space. The parameters with the
    lowest ``−log p(D)`` seen are restored at the end together with the Laplace approximation
    fitted at them (laplace-torch refits it there, one curvature pass more for the same result;
    with ``"ggn-mc"`` the Monte-Carlo draws of that fit are kept rather than redrawn).

    Arguments, defaults and returns are laplace-torch's ``marglik_training``; ``backend`` takes
    ``"ggn"``, ``"ggn-mc"``, ``"ef"`` or a laplace-torch curvature class (mapped by name, see
    :func:`backend_name`). On a plain model with deterministic data it gives laplace-torch's
    numbers. Where laplace-torch is wrong, this function differs:

    - the model is put back in train mode for every epoch (laplace-torch leaves it in eval mode
      after the first Laplace fit, which silently turns dropout off);
    - only trainable parameters are optimised, priored and copied for the best model
      (laplace-torch deep-copies the whole state dict, frozen base model included);
    - ``N`` counts the data points the likelihood sums over (target tokens for ``causal_lm``,
      labels other than -100), not ``len(train_loader.dataset)``;
    - ``hessian_structure="kron"`` works with ``prior_structure="diag"``;
    - regression with ``hessian_structure="kron"``: laplace-torch's ``KronLaplace`` gives a wrong
      gradient of the marginal likelihood in ``sigma_noise`` (autograd disagrees with finite
      differences by a few percent), so its noise, and from there everything, drifts from ours;
    - ``optimizer_kwargs`` is not modified in place; regression with several outputs sums the
      squared error over outputs (laplace-torch's ``MSELoss`` also averages over them, which
      weights the prior by the number of outputs).

    A curvature fit that is not finite (NaN or Inf logits or curvature, a failed
    eigendecomposition) skips that update with a ``RuntimeWarning``, as in
    :class:`~hf_marglik.MargLikTrainer` (both run :class:`~hf_marglik.loop.MargLikLoop`); the
    hyperparameters and the model stay finite.

    Beyond laplace-torch (keyword-only): ``marglik_curvature="online"`` takes the curvature of
    an update from the training steps of the epochs before it instead of a pass over
    ``train_loader`` (:mod:`hf_marglik.online`: the layer inputs of the training forward
    passes and one extra backward of sampled labels on every ``k``-th step,
    ``k = ceil((2/3) / marglik_budget)``), as :class:`~hf_marglik.MargLikTrainer` does by
    default. It saves the pass (about an epoch per update) at the price of factors that mix
    the parameters of the window and see dropout; the default ``"fit"`` keeps laplace-torch's
    algorithm and numbers. The LoRA-prior settings of the trainers are keywords too:
    ``prior_application="decoupled"`` (:class:`~hf_marglik.PriorApplication`: the loss is the
    likelihood, and each optimizer step is followed by ``θ ← θ − lr·(δ_l/(N·c))·θ``),
    ``tie_lora_prior`` (one precision per LoRA adapter, :func:`~hf_marglik.lora.lora_groups`)
    and ``max_log_prior_step`` (a trust region on ``log δ`` per update). Their defaults are
    laplace-torch's algorithm.

    Returns:
        ``(lap, model, margliks, losses)``: the Laplace approximation at the best parameters
        (if the final fit is not finite, with a warning, a Laplace without a posterior: the
        learned hyperparameters and the MAP, its posterior methods raising an error that names
        the fault, ``lap.fit_error``),
        the model, the negative log marginal likelihoods (one per hyper-step) and the mean
        training loss (log joint per data point) of every epoch.
    """
    likelihood = coerce(Likelihood, likelihood, "likelihood")
    hessian_structure = coerce(HessianStructure, hessian_structure, "hessian_structure")
    prior_structure = coerce(PriorStructure, prior_structure, "prior_structure")
    backend = backend_name(backend)
    curvature = coerce(CurvatureSource, marglik_curvature, "marglik_curvature")
    every = interval_for_budget(marglik_budget)  # a budget outside (0, 1] is a ValueError
    check_settings(
        lr_hyp=lr_hyp,
        n_hypersteps=n_hypersteps,
        marglik_frequency=marglik_frequency,
        n_epochs_burnin=n_epochs_burnin,
        prior_prec_init=prior_prec_init,
        sigma_noise_init=sigma_noise_init,
        temperature=temperature,
        enable_backprop=enable_backprop,
    )
    application = coerce(PriorApplication, prior_application, "prior_application")
    optimizer_kwargs = dict(optimizer_kwargs or {})
    if application == PriorApplication.DECOUPLED and optimizer_kwargs.get("weight_decay", 0):
        raise ValueError(
            "prior_application='decoupled' decays the parameters by the learned prior, and "
            "optimizer_kwargs has weight_decay > 0, which would decay them a second time. Leave "
            "weight_decay out of optimizer_kwargs."
        )
    if optimizer_kwargs.get("weight_decay", 0) != 0:
        warnings.warn("Weight decay is handled and optimized. Will be set to 0.", stacklevel=2)
        optimizer_kwargs["weight_decay"] = 0.0
    if n_epochs_burnin > n_epochs:
        warnings.warn(
            f"n_epochs_burnin={n_epochs_burnin} exceeds n_epochs={n_epochs}: no hyperparameter "
            "update will happen.",
            stacklevel=2,
        )

    named = trainable_parameters(model)
    names, params = [n for n, _ in named], [p for _, p in named]
    hyper = HyperOptimizer(
        [p.numel() for p in params],
        likelihood,
        prior_structure,
        prior_prec_init,
        sigma_noise_init,
        temperature,
        fix_sigma_noise,
        lr_hyp,
        device=params[0].device,
        dtype=params[0].dtype,
        tie_groups=lora_groups(names) if tie_lora_prior else None,
        max_log_step=max_log_prior_step,
    )
    N = count_data_points(train_loader, likelihood, dict_key_x, dict_key_y)
    optimizer = optimizer_cls(params, **optimizer_kwargs)
    scheduler = None
    if scheduler_cls is not None:
        scheduler = scheduler_cls(optimizer, **(scheduler_kwargs or {}))

    def new_laplace(prec, sigma) -> Laplace:
        return Laplace(
            model,
            likelihood,
            hessian_structure=hessian_structure,
            prior_precision=prec,
            sigma_noise=sigma,
            temperature=temperature,
            backend=backend,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
        )

    def fit(prec, sigma) -> Laplace:
        lap = new_laplace(prec, sigma).fit(train_loader)
        model.train()
        return lap

    online = None
    if curvature == CurvatureSource.ONLINE:
        online = OnlineCurvature.for_laplace(
            new_laplace(hyper.prior_precision, hyper.sigma_noise),
            every,
            seed=int(torch.randint(2**31 - 1, ())),  # reproducible under torch.manual_seed
        )

    def online_fit(prec, sigma) -> Laplace:
        return new_laplace(prec, sigma).fit_from(online.result(N))

    loop = MargLikLoop(params, hyper, n_hypersteps, restore_best=True, new_laplace=new_laplace)
    device = params[0].device
    step = 0
    for epoch in tqdm.trange(1, n_epochs + 1, disable=not progress_bar, desc="[Training]"):
        model.train()
        epoch_loss = 0.0
        updating = epoch % marglik_frequency == 0 and epoch >= n_epochs_burnin
        for batch in train_loader:
            inputs, y = split_batch(batch, dict_key_x, dict_key_y)
            inputs, y = to_device(inputs, device), to_device(y, device)
            mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
            optimizer.zero_grad()
            sampled = online if updating and online is not None and online.due(step) else None
            with sampled.recording(model) if sampled else contextlib.nullcontext() as rec:
                t = targets_for(call_model(model, inputs, dict_key_x), y, likelihood, mask)
                if sampled is not None and t.n_data > 0:  # one extra backward on this graph
                    x = inputs[dict_key_x] if isinstance(inputs, Mapping) else inputs
                    sampled.add(rec, t, mask, x, step)
            if t.n_data == 0:
                continue
            step += 1
            decoupled = application == PriorApplication.DECOUPLED
            with torch.no_grad() if decoupled else contextlib.nullcontext():  # logged only
                prior = hyper.prior_term(params) * t.n_data / N
            data = hyper.likelihood_scale * nll_sum(t)
            total = data if decoupled else data + prior
            loss = total / t.n_data
            loss.backward()
            if decoupled:  # the prior's step, before the optimizer's update (AdamW's order)
                hyper.decay_(params, optimizer, N)
                total = total + prior
            optimizer.step()
            epoch_loss += float(total.detach())
            if scheduler is not None:
                scheduler.step()
        loop.losses.append(epoch_loss / N)
        logger.info("MARGLIK[epoch=%d]: network training. Loss=%.3f.", epoch, loop.losses[-1])

        if not updating:
            continue
        best = loop.best
        update_fit = (
            fit if online is None else online.update_fit(fit, online_fit, f"of epoch {epoch}")
        )
        updated = loop.update(epoch, update_fit)
        if online is not None:
            online.reset()
        if updated is not None and loop.best is not best:
            logger.info("MARGLIK[epoch=%d]: MargLik=%.2f, new best.", epoch, loop.best_marglik)

    # the best update's fit was made at exactly its parameters: it is reused at the end instead
    # of refitting (laplace-torch refits, which costs one more curvature pass)
    lap = loop.finish(n_epochs, fit)
    if loop.best is not None:
        logger.info("MARGLIK: best of %s restored: %s", names[:3], loop.best.prior_precision)
    return lap, model, loop.margliks, loop.losses
