"""``FunctionSpaceLaplace`` (hf_marglik/function_space.py) against the dense exact GGN.

In float64 on tiny models (an MLP classifier with a -100 label, an MLP regressor, a LoRA'd BERT
classifier and regressor), with scalar and layerwise priors at several precisions:

* the log marginal likelihood and its gradients in ``δ`` (and ``σ``) equal
  ``Laplace(hessian_structure="full", backend="ggn")``'s;
* the GLM predictive (probit and Monte-Carlo probabilities, regression mean and variance)
  equals ``Laplace``'s, and the full output covariance equals ``J* Σ J*ᵀ`` from dense
  Jacobians (tests/references.py);
* MacKay's ``γ_l`` equals ``P_l − δ_l tr(Σ_ll)``; the optimised precisions satisfy
  ``δ_l ‖θ*_l‖² = γ_l`` and agree with maximising the dense evidence;
* a prior mean, a subset of tensors (the others fixed), a temperature;
* the linearised model's mode and evidence (Antorán et al., 2022): exact Gaussian marginal
  likelihood of the linear model for regression, stationarity and the dense parameter-space
  Laplace evidence at the mode for classification.
"""

from __future__ import annotations

import math

import models as M
import pytest
import references as R
import torch

from hf_marglik import Laplace
from hf_marglik.function_space import FunctionSpaceLaplace, maximise_evidence

RTOL = 1e-10
SIGMA = 0.8

CASES = {
    "mlp-cls": (M.mlp_classification, "classification"),
    "mlp-reg": (M.mlp_regression, "regression"),
    "bert-cls": (M.bert_lora, "classification"),
    "bert-reg": (lambda: M.bert_lora(num_labels=2, regression=True), "regression"),
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def close(actual, expected, **kw):
    """``R.assert_close`` that also fails on non-finite entries (NaN compares as close)."""
    assert bool(torch.isfinite(torch.as_tensor(actual)).all()), f"{kw.get('what', '')}: non-finite"
    R.assert_close(actual, expected, **kw)


def case(name):
    builder, lik = CASES[name]
    model, batches = builder()
    return model, batches, lik


def key_x(batches):
    return "input_ids" if isinstance(batches[0], dict) else "x"


def n_tensors(model):
    return len(R.trainable(model))


def priors(model):
    """Scalar and layerwise precisions spanning weak to strong priors."""
    n = n_tensors(model)
    return {
        "scalar-0.1": torch.tensor([0.1]),
        "scalar-3": torch.tensor([3.0]),
        "layerwise": torch.linspace(0.05, 5.0, n),
        "layerwise-strong": torch.logspace(0, 2, n),
    }


def sigma_for(lik):
    return SIGMA if lik == "regression" else 1.0


def fitted(model, batches, lik, temperature=1.0, prior_mean=None):
    kw = dict(dict_key_x=key_x(batches), temperature=temperature, sigma_noise=sigma_for(lik))
    full = Laplace(model, lik, hessian_structure="full", backend="ggn", **kw).fit(batches)
    fs = FunctionSpaceLaplace(model, lik, prior_mean=prior_mean, **kw).fit(batches)
    return full, fs


def test_loss_root_squares_to_softmax_hessian():
    from hf_marglik.function_space import loss_root
    from hf_marglik.options import Likelihood

    f = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    L = loss_root(f, Likelihood.CLASSIFICATION)
    close(L @ L.transpose(1, 2), R.loss_hessian(f, "classification"), what="L Lᵀ")


@pytest.mark.parametrize("name", list(CASES))
def test_log_marglik_and_gradient_equal_full_ggn(name):
    model, batches, lik = case(name)
    full, fs = fitted(model, batches, lik)
    for label, prec in priors(model).items():
        a = prec.double().clone().requires_grad_(True)
        b = prec.double().clone().requires_grad_(True)
        want = full.log_marginal_likelihood(prior_precision=a)
        got = fs.log_marginal_likelihood(prior_precision=b)
        close(got, want, rtol=RTOL, what=f"{name} {label} log marglik")
        (ga,) = torch.autograd.grad(want, a)
        (gb,) = torch.autograd.grad(got, b)
        close(gb, ga, rtol=1e-8, atol_rel=1e-10, what=f"{name} {label} d/dδ")


@pytest.mark.parametrize("name", ["mlp-reg", "bert-reg"])
def test_log_marglik_gradient_in_sigma_equals_full_ggn(name):
    model, batches, lik = case(name)
    full, fs = fitted(model, batches, lik)
    prec = priors(model)["layerwise"].double()
    for s in (0.3, 0.8, 2.0):
        a = torch.tensor(s, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(s, dtype=torch.float64, requires_grad=True)
        want = full.log_marginal_likelihood(prec, a)
        got = fs.log_marginal_likelihood(prec, b)
        close(got, want, rtol=RTOL, what=f"σ={s} log marglik")
        close(torch.autograd.grad(got, b)[0], torch.autograd.grad(want, a)[0], rtol=1e-8, what="dσ")


def test_temperature_enters_as_f():
    model, batches, lik = case("mlp-cls")
    full, fs = fitted(model, batches, lik, temperature=2.5)
    for label, prec in priors(model).items():
        close(
            fs.log_marginal_likelihood(prec),
            full.log_marginal_likelihood(prec),
            rtol=RTOL,
            what=label,
        )
    full.prior_precision = fs.prior_precision = priors(model)["layerwise"]
    x = batches[0]
    close(fs(x), full(x), rtol=RTOL, what="probit at T=2.5")


@pytest.mark.parametrize("name", list(CASES))
def test_glm_predictive_equals_full_ggn(name):
    model, batches, lik = case(name)
    full, fs = fitted(model, batches, lik)
    test_batch = case(name)[1][0] if name.startswith("bert") else batches[1]
    if name.startswith("mlp"):  # inputs not seen in training
        g = torch.Generator().manual_seed(7)
        x = torch.randn(6, 3, dtype=torch.float64, generator=g)
        test_batch = (x, torch.zeros(6, dtype=torch.long))
    kernels = fs.test_kernels(test_batch)
    for label, prec in priors(model).items():
        full.prior_precision = prec
        if lik == "regression":
            mean_w, cov_w = full(test_batch)
            mean_g, cov_g = fs.predict(kernels, prior_precision=prec)
            close(mean_g, mean_w, rtol=RTOL, what=f"{label} mean")
            close(cov_g, cov_w, rtol=RTOL, atol_rel=1e-12, what=f"{label} covariance")
            continue
        got = fs.predict(kernels, prior_precision=prec)
        close(got, full(test_batch), rtol=RTOL, what=f"{label} probit")
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        want = full(test_batch, link_approx="mc", n_samples=50, generator=g1)
        got = fs.predict(kernels, "mc", n_samples=50, generator=g2, prior_precision=prec)
        close(got, want, rtol=1e-9, what=f"{label} mc")


@pytest.mark.parametrize("name", ["mlp-cls", "bert-cls"])
def test_output_covariance_equals_dense_reference(name):
    model, batches, lik = case(name)
    _, fs = fitted(model, batches, lik)
    ref = R.dense_ggn(model, batches, lik)
    test_batch = batches[0]
    J, _, _ = R.jacobian(model, (test_batch if name == "mlp-cls" else test_batch), lik)
    for label, prec in priors(model).items():
        P = torch.diag(R.per_parameter(prec, ref.sizes))
        Sigma = torch.linalg.inv(ref.H + P)
        want = torch.einsum("nkp,pq,nlq->nkl", J, Sigma, J)
        _, got = fs.functional_covariance(fs.test_kernels(test_batch), prec)
        close(got, want, rtol=1e-9, atol_rel=1e-11, what=f"{label} J Σ Jᵀ")


@pytest.mark.parametrize("name", ["mlp-cls", "bert-reg"])
def test_effective_parameters_and_evidence_optimum(name):
    model, batches, lik = case(name)
    full, fs = fitted(model, batches, lik)
    ref = R.dense_ggn(model, batches, lik)
    f = 1.0 / sigma_for(lik) ** 2
    prec = priors(model)["layerwise"].double()
    Sigma = torch.linalg.inv(f * ref.H + torch.diag(R.per_parameter(prec, ref.sizes)))
    want = torch.stack(
        [
            s - d * torch.diagonal(b).sum()
            for s, d, b in zip(ref.sizes, prec, R.blocks(Sigma, ref.sizes))
        ]
    )
    close(fs.effective_parameters(prec), want, rtol=1e-9, what="γ")
    best = fs.optimize_prior_precision("layerwise", init=prec)
    close(best * fs.scatter_per_tensor(), fs.effective_parameters(best), rtol=1e-6, what="δ‖θ‖²=γ")
    dense = maximise_evidence(lambda d: full.log_marginal_likelihood(prior_precision=d), prec)
    close(best, dense, rtol=1e-5, what="optimum vs dense")
    scalar = fs.optimize_prior_precision("scalar")
    close(
        (scalar * fs.scatter_per_tensor().sum()).reshape(()),
        fs.effective_parameters(scalar).sum(),
        rtol=1e-6,
        what="scalar optimum",
    )


def test_prior_mean_enters_the_scatter_term():
    model, batches, lik = case("bert-cls")
    theta = R.flat_params(model)
    mu = torch.randn(theta.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    full, fs = fitted(model, batches, lik, prior_mean=mu)
    ref = R.dense_ggn(model, batches, lik)
    for label, prec in priors(model).items():
        p = R.per_parameter(prec, ref.sizes)
        want = R.log_marglik(ref.H, theta - mu, p, ref.loss, lik, ref.n_data, ref.n_outputs)
        close(fs.log_marginal_likelihood(prec), want, rtol=RTOL, what=label)


def test_subset_equals_laplace_over_those_tensors_only():
    model, batches, lik = case("bert-cls")
    _, fs = fitted(model, batches, lik)
    keep = [n for n in fs.param_names if "classifier" in n]
    head = fs.subset(keep)
    kernels = head.test_kernels(batches[0])
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    full = Laplace(model, lik, hessian_structure="full", backend="ggn").fit(batches)
    for prec in (torch.tensor([0.3]), torch.tensor([0.5, 4.0])):
        full.prior_precision = prec
        close(head.log_marginal_likelihood(prec), full.log_marginal_likelihood(), rtol=RTOL)
        close(head.predict(kernels, prior_precision=prec), full(batches[0]), rtol=RTOL)


def test_linearised_mode_regression_is_the_exact_linear_gaussian_evidence():
    model, batches, lik = case("mlp-reg")
    theta = R.flat_params(model)
    mu = 0.3 * torch.randn(
        theta.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    _, fs = fitted(model, batches, lik, prior_mean=mu)
    prec = priors(model)["layerwise"].double()
    J = torch.cat([R.jacobian(model, b, lik)[0] for b in batches]).reshape(-1, theta.numel())
    f0 = torch.cat([R.jacobian(model, b, lik)[1] for b in batches]).reshape(-1)
    y = torch.cat([b[1] for b in batches]).reshape(-1)
    D = torch.diag(1.0 / R.per_parameter(prec, R.sizes(model)))
    cov = J @ D @ J.T + SIGMA**2 * torch.eye(y.numel(), dtype=torch.float64)
    prior = f0 + J @ (mu - theta)
    want = torch.distributions.MultivariateNormal(prior, cov).log_prob(y)
    mode = fs.linearised_mode(prec)
    close(fs.linearised_log_marginal_likelihood(mode), want, rtol=RTOL, what="evidence")
    # its posterior predictive is the Gaussian-process posterior with kernel J P⁻¹ Jᵀ
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, dtype=torch.float64, generator=g)
    test = (x, torch.zeros(4, 2, dtype=torch.float64))
    Js, f0s, _ = R.jacobian(model, test, lik)
    Js = Js.reshape(-1, theta.numel())
    Kst = J @ D @ Js.T
    mean_want = f0s.reshape(-1) + Js @ (mu - theta) + Kst.T @ torch.linalg.solve(cov, y - prior)
    cov_want = Js @ D @ Js.T - Kst.T @ torch.linalg.solve(cov, Kst)
    mean_got, cov_got = fs.predict(fs.test_kernels(test), mode=mode)
    close(mean_got.reshape(-1), mean_want, rtol=1e-9, atol_rel=1e-11, what="mean")
    blocks = torch.stack([cov_want[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] for i in range(4)])
    close(cov_got, blocks, rtol=1e-9, atol_rel=1e-11, what="covariance")


def test_linearised_mode_classification_is_stationary_and_its_dense_evidence():
    model, batches, lik = case("mlp-cls")
    theta = R.flat_params(model)
    _, fs = fitted(model, batches, lik)
    prec = priors(model)["layerwise"].double()
    mode = fs.linearised_mode(prec)
    # θ_lin = P⁻¹Jᵀα; the linear model's gradient Jᵀ(∇ℓ) + P θ_lin vanishes there
    Js, fs0, ys = zip(*[R.jacobian(model, b, lik) for b in batches])
    J, f0, y = torch.cat(Js).reshape(-1, theta.numel()), torch.cat(fs0), torch.cat(ys)
    p = R.per_parameter(prec, R.sizes(model))
    th = (J.T @ mode.alpha) / p
    F = f0 + (J @ (th - theta)).reshape(f0.shape)
    close(F, mode.outputs, rtol=1e-9, atol_rel=1e-11, what="outputs")
    grad = J.T @ (torch.softmax(F, -1) - torch.nn.functional.one_hot(y, F.shape[1])).reshape(-1)
    assert float((grad + p * th).abs().max()) < 1e-9 * float(grad.abs().max())
    lam = R.loss_hessian(F, lik)
    H = torch.einsum("np,nq->pq", J, torch.block_diag(*lam) @ J)
    want = R.log_marglik(H, th, p, R.nll(F, y, lik).sum(), lik, F.shape[0], F.shape[1])
    close(fs.linearised_log_marginal_likelihood(mode), want, rtol=RTOL, what="evidence")
    best, mode, _ = fs.optimize_linearised(prec, rtol=1e-9)
    gamma = fs.linearised_effective_parameters(mode)
    free = best < 1e8  # the others are switched off (automatic relevance determination)
    assert bool(free.any())
    close((best * fs.linearised_scatter(mode))[free], gamma[free], rtol=1e-6, what="fixed point")
    assert float(gamma[~free].abs().sum()) < 1e-6


def test_bad_precisions_are_refused():
    model, batches, lik = case("mlp-cls")
    _, fs = fitted(model, batches, lik)
    with pytest.raises(ValueError, match="fits no structure"):
        fs.log_marginal_likelihood(torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        fs.prior_precision = torch.tensor([0.0])
    with pytest.raises(ValueError, match="causal_lm|classification"):
        FunctionSpaceLaplace(model, "causal_lm")
    assert math.isfinite(float(fs.log_marginal_likelihood()))
