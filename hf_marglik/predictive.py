"""Posterior predictive distributions of a fitted :class:`~hf_marglik.Laplace`.

``glm``: the network linearised in its trainable parameters, ``f(x) ~ N(f*(x), J(x) Σ J(x)ᵀ)``;
``J`` comes from one backward pass per output (ASDL-recorded per-example gradients).
``nn``: average of the softmax over networks whose trainable parameters are drawn from the
posterior (matrix-normal per K-FAC block, no dense covariance). Names follow laplace-torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from . import batches as B
from .curvature import Recorder, per_example_grads
from .options import Likelihood, LinkApprox, PredType, coerce
from .posterior import quadratic, samples

MAX_GLM_OUTPUTS = 64
SAMPLE_CHUNK = 16


def _inputs(lap, batch):
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != lap.dict_key_y}
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0]
    return batch


def glm_moments(lap, batch) -> tuple[Tensor, Tensor]:
    """Mean ``(n, k)`` and covariance ``(n, k, k)`` of the linearised network's outputs."""
    logits, jacobians = glm_jacobians(lap, batch)
    return logits, glm_covariance(lap, jacobians, *logits.shape)


def glm_covariance(lap, jacobians: list[Tensor], n: int, k: int) -> Tensor:
    """``J(x) Σ J(x)ᵀ`` per example, ``(n, k, k)``, from :func:`glm_jacobians`: the Jacobians
    depend on the model only, so one set serves several posteriors over the same parameters
    (e.g. compressed ones)."""
    cov = quadratic(lap, jacobians).reshape(n, k, n, k)
    return torch.diagonal(cov, dim1=0, dim2=2).permute(2, 0, 1)


def glm_jacobians(lap, batch) -> tuple[Tensor, list[Tensor]]:
    """The logits ``(n, k)`` and, per trainable tensor, the Jacobian of the logits in it,
    ``(n·k, numel)`` with rows ordered example-major."""
    model = lap.model
    inputs = B.to_device(_inputs(lap, batch), lap.device)
    was_training = model.training
    model.eval()
    rec = Recorder(lap._sites, lap.dtype)
    try:
        with rec.recording(model), torch.enable_grad():
            logits = B.call_model(model, inputs, lap.dict_key_x)
            if logits.ndim != 2:
                raise ValueError(
                    f"pred_type='glm' needs outputs (batch, k); got {tuple(logits.shape)}. For "
                    "token-level outputs use pred_type='nn'."
                )
            n, k = logits.shape
            if k > MAX_GLM_OUTPUTS:
                raise ValueError(
                    f"pred_type='glm' takes one backward pass per output and the model has {k}; "
                    f"the limit is {MAX_GLM_OUTPUTS}. Use pred_type='nn'."
                )
            acts = rec.inputs()
            rows: list[list[Tensor]] = []
            for c in range(k):
                e = torch.zeros_like(logits)
                e[:, c] = 1.0
                torch.autograd.grad(
                    logits, lap._params, grad_outputs=e, retain_graph=c < k - 1, allow_unused=True
                )
                rows.append(
                    per_example_grads(lap._sites, len(lap._sizes), acts, rec.output_grads(acts))
                )
    finally:
        model.train(was_training)
    # rows ordered (n, k): example-major, so per-example blocks lie on the diagonal
    chunks = [
        torch.stack([r[i] for r in rows], dim=1).reshape(n * k, -1) for i in range(len(lap._sizes))
    ]
    return logits.detach().to(lap.dtype), chunks


def predictive(
    lap,
    batch,
    pred_type: PredType | str = PredType.GLM,
    link_approx: LinkApprox | str = LinkApprox.PROBIT,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
):
    """Class probabilities ``(n, k)`` for categorical likelihoods; for regression the mean and the
    variance of the function ``(n, k)`` (add ``sigma_noise²`` for the predictive of ``y``, as in
    laplace-torch)."""
    pred_type = coerce(PredType, pred_type, "pred_type")
    link_approx = coerce(LinkApprox, link_approx, "link_approx")
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples} must be at least 1.")
    lap._check_fitted()
    regression = lap.likelihood == Likelihood.REGRESSION
    if pred_type == PredType.NN:
        return _nn_predictive(lap, batch, n_samples, generator, regression)
    mean, cov = glm_moments(lap, batch)
    var = torch.diagonal(cov, dim1=1, dim2=2)
    if regression:
        return mean, var
    if link_approx == LinkApprox.PROBIT:
        return torch.softmax(mean / torch.sqrt(1.0 + math.pi / 8.0 * var), dim=-1)
    L = torch.linalg.cholesky(cov + 1e-10 * torch.eye(cov.shape[-1], dtype=cov.dtype))
    z = torch.randn(n_samples, *mean.shape, 1, generator=generator, dtype=mean.dtype)
    f = mean + (L @ z).squeeze(-1)
    return torch.softmax(f, dim=-1).mean(0)


@torch.no_grad()
def _nn_predictive(lap, batch, n_samples, generator, regression):
    model = lap.model
    inputs = B.to_device(_inputs(lap, batch), lap.device)
    saved = [p.detach().clone() for p in lap._params]
    mean = list(torch.split(lap.mean, lap._sizes))
    was_training = model.training
    model.eval()
    outs = []
    try:
        for start in range(0, n_samples, SAMPLE_CHUNK):
            draws = samples(lap, min(SAMPLE_CHUNK, n_samples - start), generator)
            for k in range(draws[0].shape[0]):
                for p, m, d in zip(lap._params, mean, draws):
                    p.copy_((m + d[k]).reshape(p.shape).to(p.dtype))
                f = B.call_model(model, inputs, lap.dict_key_x).to(lap.dtype)
                outs.append(f if regression else torch.softmax(f, dim=-1))
    finally:
        for p, s in zip(lap._params, saved):
            p.copy_(s)
        model.train(was_training)
    stacked = torch.stack(outs)
    if regression:
        return stacked.mean(0), stacked.var(0, unbiased=False)
    return stacked.mean(0)
