"""``Laplace`` against brute-force dense references (tests/references.py) in float64.

* "full" is the exact GGN, "diag" its diagonal (rtol ~1e-10), on MLPs and LoRA transformers,
  for classification, regression and causal_lm (with -100 labels and padding).
* "kron" equals the per-tensor blocks of the exact GGN where K-FAC is exact: deep linear
  networks with MSE, K-FAC-expand with a loss per position and K-FAC-reduce with one loss per
  sequence (Eschenhagen et al., 2023) — with and without padding.
* Log marginal likelihood and its gradients in log prior precision / log sigma; data counts;
  backends "ef" (per-point gradient outer products) and "ggn-mc" (converges to "ggn").

The first section tests the references themselves.
"""

from __future__ import annotations

import math

import models as M
import pytest
import references as R
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------- helpers


def make_laplace(model, likelihood, **kw):
    from hf_marglik import Laplace

    return Laplace(model, likelihood, **kw)


def dict_key_x_for(batches):
    b = batches[0]
    if isinstance(b, dict):
        return "x" if "x" in b else "input_ids"
    return "input_ids"


CASES = {
    "mlp-cls": (M.mlp_classification, "classification"),
    "mlp-reg": (M.mlp_regression, "regression"),
    "bert-cls": (M.bert_lora, "classification"),
    "bert-reg": (lambda: M.bert_lora(num_labels=2, regression=True), "regression"),
    "gpt2-lm": (M.gpt2_lora, "causal_lm"),
    "llama-lm": (M.llama_lora, "causal_lm"),
    # more than 64 outputs: the exact GGN takes one column per class (C of them) instead of
    # the C − 1 columns of the eigendecomposed softmax Hessian
    "mlp-cls-70": (lambda: M.mlp_classification(n_classes=70), "classification"),
    "gpt2-lm-v80": (lambda: M.gpt2_lora(vocab=80), "causal_lm"),
}
SIGMA = 0.8  # regression noise used throughout


def case(name):
    builder, lik = CASES[name]
    model, batches = builder()
    return model, batches, lik


def layerwise_prior(model):
    n = len(R.trainable(model))
    return torch.linspace(0.5, 2.0, n, dtype=torch.float64)


def fit(model, batches, lik, structure, backend="ggn", prior=None, **kw):
    kw.setdefault("sigma_noise", SIGMA if lik == "regression" else 1.0)
    lap = make_laplace(
        model,
        lik,
        hessian_structure=structure,
        backend=backend,
        prior_precision=layerwise_prior(model) if prior is None else prior,
        dict_key_x=dict_key_x_for(batches),
        **kw,
    )
    lap.fit(batches)
    return lap


def ref_log_marglik(ref, H, lap_prior, lik, sigma=None, temperature=1.0):
    prec = R.per_parameter(lap_prior, ref.sizes)
    sigma = (SIGMA if lik == "regression" else 1.0) if sigma is None else sigma
    return R.log_marglik(
        H, ref.theta, prec, ref.loss, lik, ref.n_data, ref.n_outputs, sigma, temperature
    )


# --------------------------------------------------------------------- the references


def _hessian_of_loss(model, batches, lik):
    names = [n for n, _ in R.trainable(model)]
    shapes = [p.shape for _, p in R.trainable(model)]

    def total(th):
        chunks = th.split([math.prod(s) for s in shapes])
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        out = 0.0
        for b in batches:
            x, y = R.split(b)
            f, t = R.data_points(R.forward(model, x, params), y, lik)
            out = out + R.nll(f, t, lik).sum()
        return out

    return torch.autograd.functional.hessian(total, R.flat_params(model))


@pytest.mark.parametrize("lik", ["regression", "classification"])
def test_reference_ggn_is_hessian_for_linear_models(lik):
    """f linear in θ ⇒ GGN = Hessian of the loss (MSE: JᵀJ; CE: Jᵀ(diag p − ppᵀ)J)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 4, generator=g, dtype=torch.float64)
    if lik == "classification":
        y = torch.randint(4, (7,), generator=g)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    ref = R.dense_ggn(model, batches, lik)
    R.assert_close(ref.H, _hessian_of_loss(model, batches, lik), what="GGN vs Hessian")


@pytest.mark.parametrize("name", list(CASES))
def test_reference_points_match_hf_loss_and_gradients(name):
    """The reference's data points give the HF/PyTorch loss, and Σₙ Jₙᵀ∇ℓₙ = Σₙ gₙ = ∇L."""
    model, batches, lik = case(name)
    params = [p for _, p in R.trainable(model)]
    total = 0.0
    for b in batches:
        x, y = R.split(b)
        logits = R.forward(model, x)
        if lik == "causal_lm":
            yy = y.clone()
            yy[x["attention_mask"] == 0] = -100
            total = total + F.cross_entropy(
                logits[:, :-1].flatten(0, 1), yy[:, 1:].flatten(), reduction="sum"
            )
        elif lik == "classification":
            total = total + F.cross_entropy(logits, y, reduction="sum", ignore_index=-100)
        else:
            total = total + 0.5 * F.mse_loss(logits, y.reshape(logits.shape), reduction="sum")
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)])
    ref = R.dense_ggn(model, batches, lik)
    R.assert_close(ref.loss, total, what="loss")
    R.assert_close(R.per_point_gradients(model, batches, lik).sum(0), grad, what="Σ gₙ")
    jtg = 0.0
    for b in batches:
        J, f, t = R.jacobian(model, b, lik)
        f = f.clone().requires_grad_(True)
        (df,) = torch.autograd.grad(R.nll(f, t, lik).sum(), f)
        jtg = jtg + torch.einsum("nkp,nk->p", J, df)
    R.assert_close(jtg, grad, what="Σ Jᵀ∇ℓ")


def test_reference_causal_lm_padding_equals_trimmed_sequences():
    """Right padding + attention mask ≡ the unpadded sequences one at a time."""
    model, batches = M.gpt2_lora(pad_label=5)  # padded labels are real tokens: mask only
    ref = R.dense_ggn(model, batches, "causal_lm")
    singles = []
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][i].sum())
            singles.append({k: v[i : i + 1, :n] for k, v in b.items()})
    ref1 = R.dense_ggn(model, singles, "causal_lm")
    assert ref.n_data == ref1.n_data
    R.assert_close(ref.H, ref1.H, rtol=1e-9, what="padded vs trimmed GGN")
    R.assert_close(ref.loss, ref1.loss, what="padded vs trimmed loss")


def test_reference_log_marglik_is_exact_evidence_for_linear_gaussian():
    """Bayesian linear regression: the Laplace formula at the MAP is the exact evidence."""
    g = torch.Generator().manual_seed(0)
    n, d, sigma, delta = 9, 3, 0.7, 1.3
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    H = X.T @ X  # GGN at unit noise
    prec = torch.full((d,), delta, dtype=torch.float64)
    theta = torch.linalg.solve(H / sigma**2 + torch.diag(prec), X.T @ y / sigma**2)
    loss = 0.5 * ((X @ theta - y) ** 2).sum()
    lml = R.log_marglik(H, theta, prec, loss, "regression", n, 1, sigma)
    cov = X @ X.T / delta + sigma**2 * torch.eye(n, dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov)
    R.assert_close(lml, exact.log_prob(y), what="Laplace evidence vs exact evidence")


# ------------------------------------------------------------------ full and diag: exact


@pytest.mark.parametrize("name", list(CASES))
def test_full_equals_dense_ggn(name):
    model, batches, lik = case(name)
    ref = R.dense_ggn(model, batches, lik)
    prior = layerwise_prior(model)
    lap = fit(model, batches, lik, "full", prior=prior)
    assert lap.n_data == ref.n_data, f"n_data {lap.n_data} != {ref.n_data}"
    assert lap.n_params == ref.theta.numel()
    assert lap.n_layers == len(ref.sizes)
    assert list(lap.param_names) == [n for n, _ in R.trainable(model)]
    R.assert_close(lap.mean, ref.theta, what="mean")
    R.assert_close(lap.loss, ref.loss, what="loss")
    R.assert_close(lap.curvature_dense(), ref.H, what="full GGN")
    R.assert_close(
        lap.log_marginal_likelihood(),
        ref_log_marglik(ref, ref.H, prior, lik),
        rtol=1e-9,
        what="log marglik",
    )


@pytest.mark.parametrize("name", list(CASES))
def test_diag_equals_ggn_diagonal(name):
    model, batches, lik = case(name)
    ref = R.dense_ggn(model, batches, lik)
    prior = layerwise_prior(model)
    lap = fit(model, batches, lik, "diag", prior=prior)
    Hd = torch.diag(ref.H.diagonal())
    R.assert_close(lap.curvature_dense(), Hd, what="diag GGN")
    R.assert_close(
        lap.log_marginal_likelihood(),
        ref_log_marglik(ref, Hd, prior, lik),
        rtol=1e-9,
        what="log marglik",
    )


def test_temperature_enters_as_h_factor():
    model, batches, lik = case("mlp-cls")
    ref = R.dense_ggn(model, batches, lik)
    prior = torch.tensor([0.9], dtype=torch.float64)
    lap = fit(model, batches, lik, "full", prior=prior, temperature=0.5)
    want = ref_log_marglik(ref, ref.H, prior, lik, temperature=0.5)
    R.assert_close(lap.log_marginal_likelihood(), want, rtol=1e-9, what="log marglik at T=0.5")


# --------------------------------------------------------------- kron: exact where K-FAC is

KRON_EXACT = [(setting, padded) for setting in ("expand", "reduce") for padded in (False, True)]


@pytest.mark.parametrize("setting,padded", KRON_EXACT)
def test_kron_exact_for_deep_linear_mse(setting, padded):
    """K-FAC-expand (per-position loss) and K-FAC-reduce (per-sequence loss) equal the exact
    per-tensor GGN blocks of a deep linear network with MSE loss."""
    model, batches = M.deep_linear_seq(setting, padded=padded)
    ref = R.dense_ggn(model, batches, "regression")
    prior = layerwise_prior(model)
    lap = fit(model, batches, "regression", "kron", prior=prior, kfac_approx=setting)
    Hb = R.block_diagonal(ref.H, ref.sizes)
    assert lap.n_data == ref.n_data
    R.assert_close(lap.curvature_dense(), Hb, rtol=1e-9, what=f"kron-{setting} vs GGN blocks")
    R.assert_close(
        lap.log_marginal_likelihood(),
        ref_log_marglik(ref, Hb, prior, "regression"),
        rtol=1e-9,
        what="kron log marglik",
    )


@pytest.mark.parametrize("setting", ["expand", "reduce"])
def test_kron_wrong_approx_is_not_exact(setting):
    """The exactness tests have power: the other approximation misses the GGN blocks."""
    other = {"expand": "reduce", "reduce": "expand"}[setting]
    model, batches = M.deep_linear_seq(setting, padded=True)
    ref = R.dense_ggn(model, batches, "regression")
    lap = fit(model, batches, "regression", "kron", kfac_approx=other)
    err = R.max_rel_err(lap.curvature_dense(), R.block_diagonal(ref.H, ref.sizes))
    assert err > 1e-3, f"kron-{other} on the {setting} setting unexpectedly exact ({err:.2g})"


@pytest.mark.parametrize("setting", ["expand", "reduce"])
def test_kron_factor_convention(setting):
    """A = mean of a aᵀ (expand: over non-padded positions; reduce: over sequences of the
    position-mean â), B = sum of g gᵀ; kron(B, A) is the block, row-major in W."""
    model, batches = M.deep_linear_seq(setting, padded=True)
    lap = fit(model, batches, "regression", "kron", kfac_approx=setting)
    factors = lap.kron_factors()
    names = [n for n, _ in R.trainable(model)]
    assert len(factors) == len(names)
    xs = torch.cat([b["x"].flatten(0, 1) for b in batches])
    ms = torch.cat([b["attention_mask"].flatten() for b in batches]).bool()
    if setting == "expand":
        a = xs[ms]
        A0 = a.T @ a / a.shape[0]
    else:
        abar = torch.cat(
            [
                (b["x"] * b["attention_mask"][..., None]).sum(1)
                / b["attention_mask"].sum(1, keepdim=True)
                for b in batches
            ]
        )
        A0 = abar.T @ abar / abar.shape[0]
    B0, A = factors[0]
    R.assert_close(A, A0, what="first-layer input factor A")
    assert factors[1][1] is None, "a bias has no input factor"
    H = lap.curvature_dense()
    for (B, A), blk, n in zip(factors, R.blocks(H, R.sizes(model)), names):
        want = B if A is None else torch.kron(B, A)
        R.assert_close(want, blk, what=f"kron factors vs curvature_dense block of {n}")


# ------------------------------------------------------- log marglik gradients and counts


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise", "diag"])
def test_log_marglik_gradients_match_finite_differences(structure, prior_kind):
    model, batches, lik = case("mlp-reg")
    lap = fit(model, batches, lik, structure)
    n = {"scalar": 1, "layerwise": len(R.sizes(model)), "diag": sum(R.sizes(model))}[prior_kind]
    log_prec = torch.linspace(-0.5, 0.7, n, dtype=torch.float64)
    log_sigma = torch.tensor(math.log(0.6), dtype=torch.float64)

    def f(lp, ls):
        return lap.log_marginal_likelihood(prior_precision=lp.exp(), sigma_noise=ls.exp())

    lp, ls = log_prec.clone().requires_grad_(True), log_sigma.clone().requires_grad_(True)
    g_lp, g_ls = torch.autograd.grad(f(lp, ls), [lp, ls])
    with torch.no_grad():
        fd_lp = R.finite_difference(lambda v: f(v, log_sigma), log_prec)
        fd_ls = R.finite_difference(lambda v: f(log_prec, v), log_sigma)
    R.assert_close(g_lp, fd_lp, rtol=1e-6, atol_rel=1e-7, what="d/d log prior precision")
    R.assert_close(g_ls, fd_ls, rtol=1e-6, atol_rel=1e-7, what="d/d log sigma")
    # and the value matches the dense formula on the fitted curvature
    ref = R.dense_ggn(model, batches, lik)
    H = lap.curvature_dense().detach()
    want = ref_log_marglik(ref, H, log_prec.exp(), lik, sigma=log_sigma.exp())
    R.assert_close(f(log_prec, log_sigma), want, rtol=1e-9, what="log marglik value")


def test_n_data_counts_sequences_and_target_tokens():
    # classification: 6 sequences, one labelled -100
    model, batches, lik = case("bert-cls")
    assert fit(model, batches, lik, "diag").n_data == 5
    # regression: 6 sequences
    model, batches, lik = case("bert-reg")
    assert fit(model, batches, lik, "diag").n_data == 6
    # causal_lm: (T-1) targets per row minus padding and -100: (2 + 3) + (1 + 4)
    model, batches, lik = case("gpt2-lm")
    assert fit(model, batches, lik, "diag").n_data == 10


def test_causal_lm_attention_mask_alone_masks_padding():
    """Padded positions labelled with real tokens (not -100) are masked by attention_mask."""
    model, b_ignore = M.gpt2_lora(pad_label=-100)
    _, b_token = M.gpt2_lora(pad_label=3)
    lap1 = fit(model, b_ignore, "causal_lm", "full")
    lap2 = fit(model, b_token, "causal_lm", "full")
    assert lap1.n_data == lap2.n_data == 10
    R.assert_close(lap2.loss, lap1.loss, what="loss")
    R.assert_close(lap2.curvature_dense(), lap1.curvature_dense(), what="GGN")


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_ignored_labels_contribute_nothing(structure):
    """A sequence labelled -100 changes nothing (curvature, loss, N), also through K-FAC."""
    model, batches = M.bert_lora(ignore_one=False)
    extra = {k: v.clone() for k, v in batches[0].items()}
    extra["labels"][:] = -100
    with_extra = batches + [extra]
    lap1 = fit(model, batches, "classification", structure)
    lap2 = fit(model, with_extra, "classification", structure)
    assert lap2.n_data == lap1.n_data == 6
    R.assert_close(lap2.loss, lap1.loss, what="loss")
    if structure == "full":
        R.assert_close(lap2.curvature_dense(), lap1.curvature_dense(), what="GGN")
    else:  # K-FAC's input factor A may legitimately count the unlabelled inputs: compare B
        for (B2, _), (B1, _) in zip(lap2.kron_factors(), lap1.kron_factors()):
            R.assert_close(B2, B1, what="gradient factor B")


# ---------------------------------------------------------------------- backends ef, ggn-mc


@pytest.mark.parametrize("name", ["mlp-cls", "mlp-reg", "bert-cls", "gpt2-lm"])
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_ef_equals_per_point_gradient_outer_products(name, structure):
    """EF = Σₙ gₙgₙᵀ over data points (causal_lm: target tokens), at unit noise."""
    model, batches, lik = case(name)
    ef = R.dense_ef(model, batches, lik)
    lap = fit(model, batches, lik, structure, backend="ef")
    want = ef if structure == "full" else torch.diag(ef.diagonal())
    got = lap.curvature_dense()
    hint = ""
    if lik == "causal_lm":
        ef_seq = R.dense_ef(model, batches, lik, unit="sequence")
        want_seq = ef_seq if structure == "full" else torch.diag(ef_seq.diagonal())
        hint = f" (err vs per-sequence EF: {R.max_rel_err(got, want_seq):.3g})"
    R.assert_close(got, want, rtol=1e-9, what=f"EF {structure}{hint}")


def _mc_error(model, batches, lik, structure, n_samples, seed=0):
    ref = R.dense_ggn(model, batches, lik)
    torch.manual_seed(seed)
    lap = fit(model, batches, lik, structure, backend="ggn-mc", n_mc_samples=n_samples, seed=seed)
    exact = fit(model, batches, lik, structure, backend="ggn").curvature_dense()
    if structure == "full":
        R.assert_close(exact, ref.H, what="exact GGN")
    H = lap.curvature_dense()
    return float(torch.linalg.norm(H - exact) / torch.linalg.norm(exact))


@pytest.mark.parametrize(
    "name,structure",
    [("mlp-cls", "full"), ("mlp-reg", "diag"), ("bert-cls", "kron"), ("gpt2-lm", "kron")],
)
def test_ggn_mc_converges_to_ggn(name, structure):
    """Statistical and loose: relative Frobenius error ~ 1/√S shrinks as samples grow. For a
    causal LM the kron limit is the per-token K-FAC, which "ggn" computes (tokens' columns
    backpropagated one token at a time; see test_laplace_peers.py)."""
    model, batches, lik = case(name)
    e_few = _mc_error(model, batches, lik, structure, 1)
    e_many = _mc_error(model, batches, lik, structure, 256)
    assert e_many < 0.2, f"ggn-mc with 256 samples: rel error {e_many:.3f}"
    assert e_many < 0.5 * e_few, f"no convergence: {e_few:.3f} (S=1) → {e_many:.3f} (S=256)"
