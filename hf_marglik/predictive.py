"""Posterior predictive distributions of a fitted :class:`~hf_marglik.Laplace`, through its
public face only (``output_jacobians``, ``posterior``, ``predictive_prior``, ``sample_deltas``).
The predictive uses ``predictive_prior`` (``predictive_prior_precision`` when one was tuned on
validation data, else the prior precision), over the tensors of ``predictive_subset_of_weights``
(``predictive_view()``: the others stay at the MAP). Priors passed to the helpers below are laid
out over all of the Laplace's tensors and restricted here.

``glm``: the network linearised in its trainable parameters, ``f(x) ~ N(f*(x), J(x) Σ J(x)ᵀ)``;
``J`` comes from one backward pass per output. Classification pushes the Gaussian through the
softmax with MacKay's probit approximation, Monte-Carlo samples or the Laplace bridge
(``link_approx``: laplace-torch's four). ``nn``: average of the softmax over networks whose
trainable parameters are drawn from the posterior (matrix-normal per K-FAC block, no dense
covariance). Names and return shapes follow laplace-torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from . import batches as B
from .options import Likelihood, LinkApprox, PredType, coerce

SAMPLE_CHUNK = 16


def model_inputs(lap, batch):
    """The model inputs of ``batch``: a dict batch without its targets, ``x`` of an ``(x, y)``
    pair, or the batch itself; moved to the posterior's device."""
    if isinstance(batch, Mapping):
        batch = {k: v for k, v in batch.items() if k != lap.dict_key_y}
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        batch = batch[0]
    return B.to_device(batch, lap.device)


def glm_jacobians(lap, batch) -> tuple[Tensor, list[Tensor]]:
    """The logits ``(n, k)`` and, per trainable tensor, the Jacobian of the logits in it,
    ``(n·k, numel)`` with rows ordered example-major (:meth:`Laplace.output_jacobians`), over
    the predictive's tensors (``predictive_subset_of_weights``)."""
    return lap.predictive_view().output_jacobians(batch)


def map_outputs(lap, batch) -> Tensor:
    """The MAP model's outputs on ``batch`` in the predictive's modes (eval mode), without a
    graph: the mean of every predictive, and all of it at a point-mass predictive prior."""
    from .curvature import pass_modes

    with pass_modes(lap.model), torch.no_grad():
        return B.call_model(lap.model, model_inputs(lap, batch), lap.dict_key_x).to(lap.dtype)


def _zero_covariance(lap, n: int, k: int) -> Tensor:
    return torch.zeros(n, k, k, dtype=lap.dtype, device=lap.device)


def glm_covariance(lap, jacobians: list[Tensor], n: int, k: int, prior=None) -> Tensor:
    """``J(x) Σ J(x)ᵀ`` per example, ``(n, k, k)``, from :func:`glm_jacobians`: the Jacobians
    depend on the model only, so one set serves several posteriors or priors over the same
    parameters (compressed posteriors, a grid of prior precisions). Zero at a point-mass
    prior (:attr:`Prior.is_point_mass`)."""
    prior = lap.predictive_prior_of(lap.predictive_prior if prior is None else prior)
    if prior.is_point_mass:
        return _zero_covariance(lap, n, k)
    post = lap.predictive_view().posterior
    return post.output_covariance(jacobians, n, k, prior, lap.likelihood_factor())


def glm_covariance_fn(lap, jacobians: list[Tensor], n: int, k: int, isotropic: bool | None = None):
    """``prior -> glm_covariance(lap, jacobians, n, k, prior)`` (``None``: the predictive's
    prior), with the prior-independent work done once (:meth:`Posterior.output_covariance_fn`):
    for a grid of prior precisions or several priors over one set of Jacobians. ``isotropic``:
    whether every prior it will get is scalar or layerwise (default: the predictive prior's)."""
    if isotropic is None:
        isotropic = lap.predictive_prior.isotropic_per_tensor
    fn = lap.predictive_view().posterior.output_covariance_fn(jacobians, n, k, isotropic)
    f = lap.likelihood_factor()

    def covariance(prior=None) -> Tensor:
        prior = lap.predictive_prior_of(lap.predictive_prior if prior is None else prior)
        return _zero_covariance(lap, n, k) if prior.is_point_mass else fn(prior, f)

    return covariance


def glm_moments(lap, batch) -> tuple[Tensor, Tensor]:
    """Mean ``(n, k)`` and covariance ``(n, k, k)`` of the linearised network's outputs; at a
    point-mass predictive prior the MAP's outputs and zeros, without Jacobians."""
    if lap.predictive_prior.is_point_mass:
        logits = map_outputs(lap, batch)
        return logits, _zero_covariance(lap, *logits.shape)
    logits, jacobians = glm_jacobians(lap, batch)
    return logits, glm_covariance(lap, jacobians, *logits.shape)


def categorical(
    mean: Tensor, cov: Tensor, link_approx, n_samples: int, generator, diagonal_output=False
) -> Tensor:
    """Class probabilities of logits ``N(mean, cov)`` (``(n, k)``, ``(n, k, k)``);
    ``diagonal_output``: Monte-Carlo samples from the covariance's diagonal only."""
    link_approx = coerce(LinkApprox, link_approx, "link_approx")
    if link_approx == LinkApprox.PROBIT:
        var = torch.diagonal(cov, dim1=1, dim2=2)
        return torch.softmax(mean / torch.sqrt(1.0 + math.pi / 8.0 * var), dim=-1)
    if link_approx in (LinkApprox.BRIDGE, LinkApprox.BRIDGE_NORM):
        return laplace_bridge(mean, cov, normalise=link_approx == LinkApprox.BRIDGE_NORM)
    if not bool(cov.any()):  # no variance (a point-mass prior): every sample is the mean
        return torch.softmax(mean, dim=-1)
    if diagonal_output:
        cov = torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))
    return torch.softmax(_logit_samples(mean, cov, n_samples, generator), dim=-1).mean(0)


def laplace_bridge(mean: Tensor, cov: Tensor, normalise: bool = False) -> Tensor:
    """The mean of the Laplace bridge's Dirichlet for logits ``N(mean, cov)``.

    The softmax ignores a shift of all logits, so the Gaussian is first conditioned on
    ``1ᵀf = 0``: ``μ ← μ − Σ1 (1ᵀμ) / (1ᵀΣ1)``, ``Σ ← Σ − Σ11ᵀΣ / (1ᵀΣ1)``. With ``v`` the
    diagonal of the conditioned covariance and ``K`` classes, the Dirichlet's parameters are
    ``α_k = (1 − 2/K + e^{μ_k} Σ_l e^{−μ_l} / K²) / v_k`` and the prediction is ``α / Σα``,
    computed from ``log α`` (a softmax), so that logits far apart do not overflow.
    ``normalise``: ``μ`` and ``v`` first divided by ``sqrt(c)`` and ``c``,
    ``c = mean(v) / sqrt(K/2)``. Neither is the softmax's limit at vanishing variance: without
    ``normalise`` scaling the covariance leaves the prediction unchanged; with it a smaller
    covariance sharpens the prediction (the logits are divided by ``sqrt(c)``), so a prior grid
    can make it more confident than the MAP."""
    k = mean.shape[-1]
    row = cov.sum(-1)  # Σ1, (n, k)
    total = row.sum(-1, keepdim=True)  # 1ᵀΣ1
    var = torch.diagonal(cov, dim1=1, dim2=2) - row**2 / total
    if not bool((total > 0).all() and (var > 0).all()):
        raise ValueError(
            "link_approx='bridge' needs a positive variance of every logit given zero-sum "
            "logits, and some outputs have none (e.g. an infinite prior precision, or no "
            "trainable parameter behind them). Use link_approx='probit' or 'mc'."
        )
    mu = mean - row * mean.sum(-1, keepdim=True) / total
    if normalise:
        c = var.mean(-1, keepdim=True) / math.sqrt(k / 2)
        mu, var = mu / c.sqrt(), var / c
    # log(e^{μ_k} Σ_l e^{−μ_l} / K²), then log(1 − 2/K + that); 1 − 2/K is 0 for K = 2
    log_spread = mu + torch.logsumexp(-mu, dim=-1, keepdim=True) - 2.0 * math.log(k)
    base = torch.full_like(log_spread, math.log(1.0 - 2.0 / k) if k > 2 else -math.inf)
    return torch.softmax(torch.logaddexp(base, log_spread) - var.log(), dim=-1)


def _logit_samples(mean: Tensor, cov: Tensor, n_samples: int, generator) -> Tensor:
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    L = torch.linalg.cholesky(cov + 1e-10 * eye)
    z = torch.randn(
        n_samples, *mean.shape, 1, generator=generator, dtype=mean.dtype, device=mean.device
    )
    return mean + (L @ z).squeeze(-1)


def _check(lap, pred_type, link_approx, n_samples: int, joint: bool):
    pred_type = coerce(PredType, pred_type, "pred_type")
    link_approx = coerce(LinkApprox, link_approx, "link_approx")
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples} must be at least 1.")
    if joint and (lap.likelihood != Likelihood.REGRESSION or pred_type != PredType.GLM):
        raise ValueError(
            "joint=True (a joint Gaussian over all outputs of the batch) is for "
            "likelihood='regression' with pred_type='glm'; categorical predictives are not "
            "Gaussian. Leave joint=False."
        )
    lap.check_fitted()
    return pred_type, link_approx


def predictive(
    lap,
    batch,
    pred_type: PredType | str = PredType.GLM,
    link_approx: LinkApprox | str = LinkApprox.PROBIT,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    joint: bool = False,
    diagonal_output: bool = False,
):
    """Class probabilities ``(n, k)`` for categorical likelihoods; for regression the mean and
    the covariance of the function (laplace-torch's shapes, see :meth:`Laplace.__call__`; add
    ``sigma_noise²`` for the predictive of ``y``, as in laplace-torch)."""
    pred_type, link_approx = _check(lap, pred_type, link_approx, n_samples, joint)
    regression = lap.likelihood == Likelihood.REGRESSION
    if pred_type == PredType.NN:
        draws = _nn_outputs(lap, batch, n_samples, generator, regression)
        if lap.predictive_prior.is_point_mass:
            draws = draws[:1]  # all equal: the MAP's outputs, without rounding in the mean
        if regression:
            return draws.mean(0), draws.var(0, unbiased=False)
        return draws.mean(0)
    if joint:
        if lap.predictive_prior.is_point_mass:
            logits = map_outputs(lap, batch).reshape(-1)
            return logits, torch.zeros(len(logits), len(logits), dtype=lap.dtype, device=lap.device)
        logits, jac = glm_jacobians(lap, batch)
        view = lap.predictive_view()
        cov = view.posterior.quadratic(jac, view.predictive_prior, lap.likelihood_factor())
        return logits.reshape(-1), cov
    mean, cov = glm_moments(lap, batch)
    if regression:
        return mean, torch.diagonal(cov, dim1=1, dim2=2) if diagonal_output else cov
    return categorical(mean, cov, link_approx, n_samples, generator, diagonal_output)


def predictive_samples(
    lap,
    batch,
    pred_type: PredType | str = PredType.GLM,
    n_samples: int = 100,
    diagonal_output: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``(n_samples, n, k)`` samples of the predictive: softmax of the logit samples for
    categorical likelihoods, the function samples for regression."""
    pred_type, _ = _check(lap, pred_type, LinkApprox.MC, n_samples, False)
    regression = lap.likelihood == Likelihood.REGRESSION
    if pred_type == PredType.NN:
        return _nn_outputs(lap, batch, n_samples, generator, regression)
    mean, cov = glm_moments(lap, batch)
    if lap.predictive_prior.is_point_mass:
        f = mean.expand(n_samples, *mean.shape)
    else:
        if diagonal_output:
            cov = torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))
        f = _logit_samples(mean, cov, n_samples, generator)
    return f if regression else torch.softmax(f, dim=-1)


@torch.no_grad()
def _nn_outputs(lap, batch, n_samples, generator, regression) -> Tensor:
    """Outputs (softmax for categorical likelihoods) of ``n_samples`` networks drawn from the
    posterior, ``(n_samples, n, k)``; the parameters are restored afterwards. At a point-mass
    predictive prior every draw is the MAP."""
    if lap.predictive_prior.is_point_mass:
        f = map_outputs(lap, batch)
        f = f if regression else torch.softmax(f, dim=-1)
        return f.expand(n_samples, *f.shape)
    model = lap.model
    inputs = model_inputs(lap, batch)
    lap = lap.predictive_view()
    saved = [p.detach().clone() for p in lap.params]
    mean = list(torch.split(lap.mean, lap.sizes))
    was_training = model.training
    model.eval()
    outs = []
    try:
        for start in range(0, n_samples, SAMPLE_CHUNK):
            n = min(SAMPLE_CHUNK, n_samples - start)
            draws = lap.sample_deltas(n, generator, prior=lap.predictive_prior)
            for k in range(draws[0].shape[0]):
                for p, m, d in zip(lap.params, mean, draws):
                    p.copy_((m + d[k]).reshape(p.shape).to(p.dtype))
                f = B.call_model(model, inputs, lap.dict_key_x).to(lap.dtype)
                outs.append(f if regression else torch.softmax(f, dim=-1))
    finally:
        for p, s in zip(lap.params, saved):
            p.copy_(s)
        model.train(was_training)
    return torch.stack(outs)
