"""laplace-torch's ``BaseLaplace`` API on hf_marglik's ``Laplace``: every method gives
laplace-torch's values where both are exact (a float64 MLP with the exact GGN, laplace-torch's
``AsdlGGN`` backend; the conventions are in tests/test_laplace_peers.py), so code written for
laplace-torch's returned ``lap`` keeps working."""

from __future__ import annotations

import math

import laplace
import models as M
import pytest
import references as R
import torch
from laplace.curvature import AsdlGGN

from hf_marglik import Laplace

SIGMA = 0.8
LT_CLASSES = {"kron": "KronLaplace", "full": "FullLaplace", "diag": "DiagLaplace"}
STRUCTURES = ["kron", "full", "diag"]


def _pair(structure, lik="classification", prior=None):
    model, loader, batches = M.mlp_peer_loader(lik)  # laplace-torch has no ignore_index
    X = torch.cat([b[0] for b in batches])
    n_layers = len(R.trainable(model))
    prior = torch.linspace(0.6, 1.7, n_layers, dtype=torch.float64) if prior is None else prior
    kw = {"sigma_noise": SIGMA} if lik == "regression" else {}
    peer = getattr(laplace, LT_CLASSES[structure])(
        model, lik, prior_precision=prior.clone(), backend=AsdlGGN, **kw
    )
    peer.fit(loader)
    ours = Laplace(model, lik, hessian_structure=structure, prior_precision=prior.clone(), **kw)
    ours.fit(loader)
    g = torch.Generator().manual_seed(7)
    xt = torch.randn(6, X.shape[1], generator=g, dtype=torch.float64)
    return ours, peer, model, loader, xt


def _jacobians(model, x) -> torch.Tensor:
    """``(batch, outputs, parameters)`` by autograd, laplace-torch's layout."""
    params = [p for _, p in R.trainable(model)]
    out = model(x)
    rows = []
    for n in range(out.shape[0]):
        for c in range(out.shape[1]):
            g = torch.autograd.grad(out[n, c], params, retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows).reshape(out.shape[0], out.shape[1], -1)


def _peer_covariance(peer, structure) -> torch.Tensor:
    if structure == "kron":
        return torch.linalg.inv(peer.posterior_precision.to_matrix())
    if structure == "diag":
        return torch.diag(peer.posterior_variance)
    return peer.posterior_covariance


@pytest.mark.parametrize("structure", STRUCTURES)
def test_log_det_terms_scatter_and_posterior_precision(structure):
    ours, peer, *_ = _pair(structure)
    for name in (
        "scatter",
        "log_det_prior_precision",
        "log_det_posterior_precision",
        "log_det_ratio",
    ):
        R.assert_close(getattr(ours, name), getattr(peer, name), rtol=1e-10, what=name)
    R.assert_close(ours.prior_precision_diag, peer.prior_precision_diag, what="prior diag")
    P_ours, P_peer = ours.posterior_precision, peer.posterior_precision
    if structure == "kron":
        R.assert_close(P_ours.to_matrix(), P_peer.to_matrix(), rtol=1e-10, what="precision")
        R.assert_close(P_ours.diag(), P_peer.diag(), rtol=1e-10, what="precision diag")
        R.assert_close(P_ours.logdet(), P_peer.logdet(), rtol=1e-10, what="logdet")
    else:
        R.assert_close(P_ours, P_peer, rtol=1e-10, what="posterior precision")
    R.assert_close(ours.posterior_covariance, _peer_covariance(peer, structure), rtol=1e-9)
    R.assert_close(ours.posterior_variance, _peer_covariance(peer, structure).diagonal(), rtol=1e-9)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_functional_variance_and_covariance(structure):
    ours, peer, model, _, xt = _pair(structure)
    Js = _jacobians(model, xt)
    R.assert_close(
        ours.functional_variance(Js), peer.functional_variance(Js), rtol=1e-9, what="f var"
    )
    R.assert_close(
        ours.functional_covariance(Js), peer.functional_covariance(Js), rtol=1e-9, what="f cov"
    )


@pytest.mark.parametrize("structure", STRUCTURES)
def test_glm_probit_predictive(structure):
    ours, peer, _, _, xt = _pair(structure)
    R.assert_close(ours(xt), peer(xt, pred_type="glm", link_approx="probit"), rtol=1e-9)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_regression_predictive_marginal_and_joint(structure):
    ours, peer, _, _, xt = _pair(structure, "regression")
    mean, var = ours(xt)
    mean_p, var_p = peer(xt)
    R.assert_close(mean, mean_p, what="mean")
    R.assert_close(var, var_p, rtol=1e-9, what="(n, k, k) covariance")
    mean, cov = ours(xt, joint=True)
    mean_p, cov_p = peer(xt, joint=True)
    R.assert_close(mean, mean_p, what="joint mean")
    R.assert_close(cov, cov_p, rtol=1e-9, what="joint covariance")


@pytest.mark.parametrize("structure", STRUCTURES)
def test_log_prob(structure):
    ours, peer, *_ = _pair(structure)
    g = torch.Generator().manual_seed(3)
    value = ours.mean + 0.3 * torch.randn(ours.n_params, generator=g, dtype=torch.float64)
    for normalized in (True, False):
        R.assert_close(
            ours.log_prob(value, normalized), peer.log_prob(value, normalized), rtol=1e-10
        )


@pytest.mark.parametrize("structure", STRUCTURES)
def test_samples_have_the_posterior_moments(structure):
    """``sample(n)`` is ``(n, n_params)`` with mean θ* and covariance Σ (laplace-torch's dense
    covariance), to Monte-Carlo error: 4·(standard error) with n = 40,000."""
    ours, peer, *_ = _pair(structure)
    n = 40_000
    draws = ours.sample(n, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (n, ours.n_params)
    S = _peer_covariance(peer, structure)
    sd = S.diagonal().sqrt()
    assert ((draws.mean(0) - ours.mean).abs() <= 4 * sd / math.sqrt(n)).all()
    C = torch.cov(draws.T)
    se = torch.sqrt((S**2 + torch.outer(S.diagonal(), S.diagonal())) / n)  # Wishart s.e.
    assert ((C - S).abs() <= 4 * se + 1e-12).all()


@pytest.mark.parametrize("link", ["bridge", "bridge_norm"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_glm_laplace_bridge_predictive(structure, link):
    ours, peer, _, _, xt = _pair(structure)
    expected = peer(xt, pred_type="glm", link_approx=link)
    R.assert_close(ours(xt, link_approx=link), expected, rtol=1e-9, what=link)
    assert (ours(xt, link_approx=link) - ours(xt)).abs().max() > 1e-3  # not the probit


def test_laplace_bridge_far_apart_logits_and_zero_variance():
    """The bridge's Dirichlet parameters overflow float64 for logits 800 apart; the prediction
    (a ratio of them) does not. Scaling the covariance leaves it unchanged. A logit without
    variance is refused."""
    from hf_marglik.predictive import laplace_bridge

    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    cov = a @ a.mT + 0.1 * torch.eye(3, dtype=torch.float64)
    mean = torch.randn(4, 3, generator=g, dtype=torch.float64)
    p = laplace_bridge(mean, cov)
    R.assert_close(laplace_bridge(mean, 1e-6 * cov), p, rtol=1e-9, what="scale invariance")
    far = mean * 0 + torch.tensor([400.0, -400.0, 0.0], dtype=torch.float64)
    q = laplace_bridge(far, cov)
    assert torch.isfinite(q).all() and (q.sum(-1) - 1).abs().max() < 1e-12
    assert (q.argmax(-1) == 0).all()
    naive = (far - far.max()).exp() * (-far).exp().sum(-1, keepdim=True)  # e^{μ_k} Σ e^{−μ_l}
    assert not torch.isfinite(naive * far.max().exp()).all()  # the unscaled α overflows
    with pytest.raises(ValueError, match="positive variance.*probit"):
        laplace_bridge(mean, torch.zeros_like(cov))


def test_mc_diagonal_output_samples_the_diagonal():
    from hf_marglik.predictive import categorical

    g = torch.Generator().manual_seed(5)
    a = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    cov = a @ a.mT
    mean = torch.randn(4, 3, generator=g, dtype=torch.float64)
    diag = torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))

    def mc(c, **kw):
        return categorical(mean, c, "mc", 500, torch.Generator().manual_seed(0), **kw)

    R.assert_close(mc(cov, diagonal_output=True), mc(diag), rtol=1e-12, what="diagonal")
    assert (mc(cov, diagonal_output=True) - mc(cov)).abs().max() > 1e-3


def test_predictive_samples_average_to_the_mc_predictive():
    ours, peer, _, _, xt = _pair("full")
    samples = ours.predictive_samples(
        xt, n_samples=20_000, generator=torch.Generator().manual_seed(0)
    )
    assert samples.shape == (20_000, 6, 3)
    R.assert_close(samples.sum(-1), torch.ones(20_000, 6, dtype=torch.float64), what="simplex")
    reference = peer(xt, link_approx="mc", n_samples=200_000)
    assert (samples.mean(0) - reference).abs().max() < 0.01
    nn = ours.predictive_samples(xt, pred_type="nn", n_samples=7)
    assert nn.shape == (7, 6, 3)


def test_optimize_prior_precision_marglik_matches_laplace_torch():
    ours, peer, *_ = _pair("kron")
    ours.optimize_prior_precision(method="marglik", n_steps=50, lr=0.1)
    peer.optimize_prior_precision(method="marglik", pred_type="glm", n_steps=50, lr=0.1)
    R.assert_close(ours.prior_precision, peer.prior_precision, rtol=1e-7, what="marglik")
    ours2, peer2, *_ = _pair("full")
    kw = dict(method="marglik", n_steps=30, lr=0.1, prior_structure="layerwise")
    ours2.optimize_prior_precision(**kw)
    peer2.optimize_prior_precision(pred_type="glm", **kw)
    R.assert_close(ours2.prior_precision, peer2.prior_precision, rtol=1e-7, what="layerwise")


def test_optimize_prior_precision_gridsearch_matches_laplace_torch():
    ours, peer, _, loader, _ = _pair("kron")
    kw = dict(method="gridsearch", val_loader=loader, grid_size=21)
    ours.optimize_prior_precision(pred_type="glm", link_approx="probit", **kw)
    peer.optimize_prior_precision(pred_type="glm", link_approx="probit", **kw)
    R.assert_close(ours.prior_precision, peer.prior_precision.reshape(-1), what="grid value")


def test_gridsearch_computes_the_jacobians_once(monkeypatch):
    """100 grid values cost one Jacobian pass over the validation data, not 100."""
    ours, _, _, loader, _ = _pair("kron")
    calls = []
    real = Laplace.output_jacobians

    def counting(self, x):
        calls.append(1)
        return real(self, x)

    monkeypatch.setattr(Laplace, "output_jacobians", counting)
    ours.optimize_prior_precision(method="gridsearch", val_loader=loader, grid_size=100)
    assert len(calls) == len(loader)


def test_tuning_bad_input():
    ours, *_ = _pair("kron")
    with pytest.raises(ValueError, match="val_loader"):
        ours.optimize_prior_precision(method="gridsearch")
    with pytest.raises(ValueError, match="method='grid' is not valid"):
        ours.optimize_prior_precision(method="grid")
    no_targets = [{"input_ids": torch.zeros(2, 3, dtype=torch.float64)}]
    with pytest.raises(ValueError, match="dict_key_y='labels'"):
        ours.optimize_prior_precision(method="gridsearch", val_loader=no_targets)
    _, xt = _pair("kron")[0], torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="joint=True"):
        ours(xt, joint=True)
