r"""Brute-force dense references for the Laplace tests (tiny float64 models only).

Written independently of ``hf_marglik``: the data points are laid out here again, and every
quantity is computed from full Jacobians or per-point gradients.

Data points
    classification: one per sequence whose label is not -100; regression: one per sequence
    (a target vector); causal_lm: one per target token, ``logits[:, :-1]`` predicting
    ``labels[:, 1:]``, where the label is not -100 and ``attention_mask`` is 1.

GGN
    :math:`H = \sum_n J_n^\top \Lambda_n J_n` with :math:`J_n = \partial f_n / \partial\theta`
    (``(K, P)``, θ the trainable parameters flattened in ``named_parameters()`` order, each
    tensor row-major) and :math:`\Lambda_n = \mathrm{diag}(p_n) - p_n p_n^\top` (categorical)
    or :math:`I` (Gaussian at unit noise).

Empirical Fisher
    :math:`\sum_n g_n g_n^\top`, :math:`g_n = \nabla_\theta \ell_n` by one backward per point.

Log marginal likelihood (laplace-torch's convention)
    :math:`-h\,L - c - \tfrac12(\log\det(hH + P) - \log\det P + \theta^\top P\theta)` with
    :math:`h = 1/(\sigma^2 T)`, :math:`L` the summed NLL at unit noise (CE or ½SSE) and
    :math:`c = N K \log(\sigma\sqrt{2\pi})` for regression (0 otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

IGNORE_INDEX = -100


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in trainable(model)])


def sizes(model: nn.Module) -> list[int]:
    return [p.numel() for _, p in trainable(model)]


def split(batch, dict_key_y: str = "labels"):
    """``(inputs, y)``: inputs a dict (all keys but ``dict_key_y``) or a tensor."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != dict_key_y}, batch[dict_key_y]
    return batch[0], batch[1]


def forward(model: nn.Module, inputs, params: dict[str, Tensor] | None = None) -> Tensor:
    """The model's logits; ``params`` (name → tensor) replace the trainable parameters."""
    if params is None:
        out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    elif isinstance(inputs, Mapping):
        out = functional_call(model, params, args=(), kwargs=inputs, strict=False)
    else:
        out = functional_call(model, params, args=(inputs,), strict=False)
    return out if isinstance(out, Tensor) else out.logits


def data_points(logits: Tensor, y: Tensor, likelihood: str, attention_mask=None):
    """``(f, y)``: outputs ``(n, K)`` and targets of the ``n`` data points in the batch."""
    if likelihood == "causal_lm":
        f = logits[:, :-1].reshape(-1, logits.shape[-1])
        t = y[:, 1:].reshape(-1)
        keep = t != IGNORE_INDEX
        if attention_mask is not None:
            keep = keep & attention_mask[:, 1:].reshape(-1).bool()
        return f[keep], t[keep]
    if likelihood == "classification":
        keep = y != IGNORE_INDEX
        return logits[keep], y[keep]
    if likelihood == "regression":
        return logits, y.reshape(logits.shape).to(logits.dtype)
    raise ValueError(likelihood)


def nll(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    """Per-point NLL at unit noise: CE, or ½‖f − y‖² (without the normaliser)."""
    if likelihood == "regression":
        return 0.5 * ((f - y) ** 2).sum(-1)
    return -torch.log_softmax(f, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def loss_hessian(f: Tensor, likelihood: str) -> Tensor:
    """``(n, K, K)`` Hessians of the per-point NLL w.r.t. the outputs."""
    n, k = f.shape
    if likelihood == "regression":
        return torch.eye(k, dtype=f.dtype).expand(n, k, k)
    p = torch.softmax(f, -1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def jacobian(model: nn.Module, batch, likelihood: str, dict_key_y: str = "labels"):
    """``(J, f, y)``: ``J`` of shape ``(n, K, P)`` for the ``n`` data points of ``batch``."""
    names = [n for n, _ in trainable(model)]
    shapes = [p.shape for _, p in trainable(model)]
    theta = flat_params(model)
    inputs, y = split(batch, dict_key_y)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None

    def points(th: Tensor) -> Tensor:
        chunks = th.split([math.prod(s) for s in shapes])
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        f, _ = data_points(forward(model, inputs, params), y, likelihood, mask)
        return f

    J = jacrev(points)(theta)
    with torch.no_grad():
        f, t = data_points(forward(model, inputs), y, likelihood, mask)
    return J, f, t


@dataclass
class DenseRef:
    """Dense references over a whole loader."""

    H: Tensor  # (P, P) GGN at unit noise
    loss: Tensor  # summed NLL at unit noise
    n_data: int
    n_outputs: int
    theta: Tensor  # flat MAP vector
    sizes: list[int]


def dense_ggn(model: nn.Module, batches, likelihood: str, dict_key_y: str = "labels") -> DenseRef:
    """Exact GGN (at unit noise), summed NLL and data count over ``batches``."""
    theta = flat_params(model)
    P = theta.numel()
    H = torch.zeros(P, P, dtype=theta.dtype)
    loss = torch.zeros((), dtype=theta.dtype)
    n_data, k = 0, 0
    for batch in batches:
        J, f, t = jacobian(model, batch, likelihood, dict_key_y)
        lam = loss_hessian(f, likelihood)
        H += torch.einsum("nkp,nkl,nlq->pq", J, lam, J)
        loss += nll(f, t, likelihood).sum()
        n_data += f.shape[0]
        k = f.shape[1]
    return DenseRef(H, loss, n_data, k, theta, sizes(model))


def per_point_gradients(
    model: nn.Module, batches, likelihood: str, dict_key_y: str = "labels", unit: str = "point"
) -> Tensor:
    """``(n, P)`` gradients of each data point's NLL, one backward each.

    ``unit="sequence"`` sums the points of each sequence first (only differs for causal_lm).
    """
    params = [p for _, p in trainable(model)]
    rows = []
    for batch in batches:
        inputs, y = split(batch, dict_key_y)
        logits = forward(model, inputs)
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if likelihood == "causal_lm":
            B, T = y.shape
            keep = (y[:, 1:] != IGNORE_INDEX).reshape(-1)
            if mask is not None:
                keep = keep & mask[:, 1:].reshape(-1).bool()
            f = logits[:, :-1].reshape(-1, logits.shape[-1])
            t = torch.where(keep, y[:, 1:].reshape(-1), 0)
            losses = nll(f, t, likelihood) * keep
            seq_of = torch.arange(B).repeat_interleave(T - 1)
            groups = (
                [losses[i] for i in range(losses.numel()) if keep[i]]
                if unit == "point"
                else [losses[seq_of == b].sum() for b in range(B) if keep[seq_of == b].any()]
            )
        else:
            f, t = data_points(logits, y, likelihood, mask)
            groups = list(nll(f, t, likelihood))
        for i, li in enumerate(groups):
            g = torch.autograd.grad(li, params, retain_graph=i < len(groups) - 1)
            rows.append(torch.cat([gi.reshape(-1) for gi in g]))
    return torch.stack(rows)


def dense_ef(
    model: nn.Module, batches, likelihood: str, dict_key_y: str = "labels", unit: str = "point"
) -> Tensor:
    """Empirical Fisher ``Σ_n g_n g_nᵀ`` (at unit noise) by per-point gradients."""
    G = per_point_gradients(model, batches, likelihood, dict_key_y, unit)
    return G.T @ G


def per_parameter(prior_precision, sizes_: list[int], dtype=torch.float64) -> Tensor:
    """A scalar, layerwise or diagonal precision expanded to one entry per parameter."""
    p = torch.as_tensor(prior_precision, dtype=dtype).reshape(-1)
    if p.numel() == 1:
        return p.expand(sum(sizes_)).clone()
    if p.numel() == len(sizes_):
        return torch.repeat_interleave(p, torch.tensor(sizes_))
    assert p.numel() == sum(sizes_)
    return p


def log_marglik(
    H: Tensor,
    theta: Tensor,
    prior_prec: Tensor,
    loss: Tensor,
    likelihood: str,
    n_data: int,
    n_outputs: int,
    sigma_noise: Tensor | float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """Dense Laplace log marginal likelihood (differentiable in ``prior_prec``, ``sigma``)."""
    sigma = torch.as_tensor(sigma_noise, dtype=H.dtype)
    if likelihood != "regression":
        sigma = torch.ones((), dtype=H.dtype)
    h = 1.0 / (sigma**2 * temperature)
    log_lik = -h * loss
    if likelihood == "regression":
        log_lik = log_lik - n_data * n_outputs * torch.log(sigma * math.sqrt(2 * math.pi))
    P = torch.diag(prior_prec)
    log_det_post = torch.linalg.slogdet(h * H + P)[1]
    log_det_prior = torch.log(prior_prec).sum()
    scatter = (theta * prior_prec * theta).sum()
    return log_lik - 0.5 * (log_det_post - log_det_prior + scatter)


def block_diagonal(H: Tensor, sizes_: list[int]) -> Tensor:
    """``H`` with every entry outside the per-tensor diagonal blocks set to 0."""
    out = torch.zeros_like(H)
    start = 0
    for s in sizes_:
        out[start : start + s, start : start + s] = H[start : start + s, start : start + s]
        start += s
    return out


def blocks(H: Tensor, sizes_: list[int]) -> list[Tensor]:
    out, start = [], 0
    for s in sizes_:
        out.append(H[start : start + s, start : start + s])
        start += s
    return out


def max_rel_err(a: Tensor, b: Tensor) -> float:
    """``max|a − b| / max|b|``: a scale-free entry-wise error for reports."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def assert_close(actual, expected, rtol=1e-10, atol_rel=1e-12, what=""):
    """Entry-wise ``|a − e| ≤ rtol·|e| + atol_rel·max|e|`` with both finite; prints the worst
    entries."""
    actual = torch.as_tensor(actual, dtype=torch.float64).detach()
    expected = torch.as_tensor(expected, dtype=torch.float64).detach()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    # NaN compares False with everything: without this, NaN entries would pass
    assert torch.isfinite(expected).all(), f"{what}: the reference is not finite"
    assert torch.isfinite(actual).all(), f"{what}: got non-finite entries"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    tol = rtol * expected.abs() + atol_rel * max(scale, 1e-300)
    bad = (actual - expected).abs() > tol
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rows = [
            f"  at {tuple(i)}: got {float(actual[tuple(i)]):.12g}, "
            f"want {float(expected[tuple(i)]):.12g}"
            for i in idx
        ]
        ratio = ""
        if expected.abs().sum() > 0:
            ratio = f", sum ratio {float(actual.sum() / expected.sum()):.6g}"
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} entries differ; max rel err "
            f"{max_rel_err(actual, expected):.3g}{ratio}\n" + "\n".join(rows)
        )


def finite_difference(fn, x, eps=1e-5):
    """Central differences of the scalar function ``fn`` at ``x``, entry by entry."""
    out = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e.view(-1)[i] = eps
        out.view(-1)[i] = (fn(x + e) - fn(x - e)) / (2 * eps)
    return out
