"""``Laplace`` against the peers: laplace-torch (plain MLPs) and curvlinops (LoRA models).

Scaling conventions, so that the numbers are comparable:

* laplace-torch ``KronLaplace`` with ``AsdlGGN`` (exact GGN) on an MLP: per layer, ASDL sums
  ``a aᵀ`` and ``g gᵀ`` over a batch; laplace-torch divides the input factor by
  ``N = len(dataset)`` and sums batches, so A = mean of ``a aᵀ`` over examples and
  B = sum of ``g gᵀ`` — the same convention as hf_marglik. Weight and bias are separate blocks
  (``[B, A]`` and ``[B]``), the laplace-torch layout of hf_marglik. Its log marginal
  likelihood uses the same formula, so values must agree to rounding. (Only MLPs: on peft
  models ASDL's factors are wrong, see NOTES.md.)
* curvlinops ``KFACLinearOperator`` with ``CrossEntropyLoss(reduction="sum")``: gradient
  factor ``B = Σ g gᵀ`` (divided by ``mc_samples`` for MC); input factor
  ``A = Σ a aᵀ / (num_data · S)`` where ``S`` is the number of weight-sharing positions in the
  batch (expand) or 1 (reduce, ``a`` averaged over positions first). With ``reduction="mean"``
  it would rescale B by the number of loss terms instead; we use "sum", matching hf_marglik's
  summed NLL, and curvlinops' ``num_data`` is then irrelevant for B.
  curvlinops knows neither padding nor -100 labels: it averages A over *all* positions and
  (type-2, MC) backpropagates through every output. So each sequence is fed on its own,
  trimmed to its attention mask (right padding + causal or masked attention makes this
  identical), through a wrapper that returns only the target positions' logits; the
  per-sequence factors are combined as ``A = Σᵢ wᵢ Aᵢ / Σᵢ wᵢ`` (``wᵢ`` = positions the layer
  saw for expand, 1 for reduce: A is then the mean over all non-padded positions, or over
  sequences) and ``B = Σᵢ Bᵢ``. hf_marglik's N (sequences or target tokens) does not enter
  the factors.
* Causal LM: hf_marglik treats every target token as its own data point (N counts tokens):
  with backends ggn and ef each token's loss-Hessian columns (or its gradient) are
  backpropagated alone, so B = Σ_tokens Σ_positions g gᵀ has no token-token cross terms.
  curvlinops backpropagates a column for all tokens of a sequence at once, which adds cross
  terms (B's trace 2.4–3.9× larger on a small GPT-2, BENCHMARKS.md); its B is therefore taken
  from one operator per target token (``per_token``), A from whole sequences. MC targets drawn
  independently per token have no cross terms in expectation, so ggn-mc converges to the same
  per-token B. For classification (one loss per sequence) there is nothing to split.
"""

from __future__ import annotations

import models as M
import pytest
import references as R
import torch
from torch import nn

from hf_marglik import Laplace

SIGMA = 0.8  # regression noise

# ------------------------------------------------------------------------- laplace-torch


_mlp_loader = M.mlp_peer_loader  # laplace-torch has no ignore_index


def _prior(model, kind):
    n = 1 if kind == "scalar" else len(R.trainable(model))
    return torch.linspace(0.6, 1.7, n, dtype=torch.float64)


LT_CLASSES = {"kron": "KronLaplace", "full": "FullLaplace", "diag": "DiagLaplace"}


@pytest.mark.parametrize("lik", ["classification", "regression"])
@pytest.mark.parametrize("prior_kind", ["scalar", "layerwise"])
@pytest.mark.parametrize("structure", ["kron", "full", "diag"])
def test_log_marglik_matches_laplace_torch_on_mlp(lik, prior_kind, structure):
    import laplace
    from laplace.curvature import AsdlGGN

    model, loader, _ = _mlp_loader(lik)
    prior = _prior(model, prior_kind)
    sigma = SIGMA if lik == "regression" else 1.0
    kw = {"sigma_noise": sigma} if lik == "regression" else {}
    peer = getattr(laplace, LT_CLASSES[structure])(
        model, lik, prior_precision=prior.clone(), backend=AsdlGGN, **kw
    )
    peer.fit(loader)
    ours = Laplace(
        model, lik, hessian_structure=structure, prior_precision=prior, sigma_noise=sigma
    )
    ours.fit(loader)
    assert ours.n_data == peer.n_data
    R.assert_close(ours.loss, peer.loss, what="loss")
    R.assert_close(
        ours.log_marginal_likelihood(),
        peer.log_marginal_likelihood(),
        rtol=1e-9,
        what=f"{structure} log marglik vs laplace-torch",
    )
    # and as functions of the hyperparameters (the gradients used in marglik training). The
    # gradients are compared with finite differences of laplace-torch's *values*: its own
    # autograd gradient in sigma_noise is wrong for KronLaplace (KronDecomposed.__mul__ turns
    # the factor 1/σ² into a Python float, detaching log det from σ).
    lp = (prior * 1.3).log()
    ls = torch.tensor(sigma, dtype=torch.float64).log()

    def ours_f(lp, ls):
        return ours.log_marginal_likelihood(prior_precision=lp.exp(), sigma_noise=ls.exp())

    def peer_f(lp, ls):
        kw = {"sigma_noise": ls.exp()} if lik == "regression" else {}
        return peer.log_marginal_likelihood(prior_precision=lp.exp(), **kw)

    R.assert_close(ours_f(lp, ls), peer_f(lp, ls), rtol=1e-9, what="log marglik at new hypers")
    lp_, ls_ = lp.clone().requires_grad_(True), ls.clone().requires_grad_(True)
    g_lp, g_ls = torch.autograd.grad(ours_f(lp_, ls_), [lp_, ls_], allow_unused=True)
    with torch.no_grad():
        fd_lp = R.finite_difference(lambda v: peer_f(v, ls), lp)
        fd_ls = R.finite_difference(lambda v: peer_f(lp, v), ls)
    R.assert_close(g_lp, fd_lp, rtol=1e-6, atol_rel=1e-7, what="d/d log prior precision")
    if lik == "regression":
        R.assert_close(g_ls, fd_ls, rtol=1e-6, atol_rel=1e-7, what="d/d log sigma")


@pytest.mark.parametrize("lik", ["classification", "regression"])
def test_references_agree_with_laplace_torch_full(lik):
    """Sanity of tests/references.py against a peer: the dense GGN and loss."""
    import laplace
    from laplace.curvature import AsdlGGN

    model, loader, batches = _mlp_loader(lik)
    peer = laplace.FullLaplace(model, lik, backend=AsdlGGN)
    peer.fit(loader)
    ref = R.dense_ggn(model, batches, lik)
    R.assert_close(ref.H, peer.H, what="reference GGN vs laplace-torch FullLaplace")
    R.assert_close(ref.loss, peer.loss, what="reference loss vs laplace-torch")


# ------------------------------------------------------------------------------ curvlinops


class TargetLogits(nn.Module):
    """Wraps an HF model for curvlinops: ``X`` a dict of model inputs plus ``"_keep"``, a
    boolean mask over the shifted (causal_lm) or per-sequence (classification) targets;
    returns the logits of the kept data points as ``(n, K)``."""

    def __init__(self, model: nn.Module, likelihood: str):
        super().__init__()
        self.model = model
        self.likelihood = likelihood

    def forward(self, X):
        inputs = {k: v for k, v in X.items() if k != "_keep"}
        logits = self.model(**inputs).logits
        if self.likelihood == "causal_lm":
            logits = logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])[X["_keep"].reshape(-1)]


def _sequences(batches, lik, per_token=False):
    """Every sequence of ``batches`` trimmed to its attention mask, as a curvlinops batch;
    with ``per_token`` one copy per target token with only that target kept."""
    out = []
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][i].sum())
            X = {k: v[i : i + 1, :n] for k, v in b.items() if k != "labels"}
            y = b["labels"][i : i + 1]
            if lik == "causal_lm":
                y = y[:, 1:n]
            keep = y != -100
            if not per_token:
                out.append((dict(X, _keep=keep), y[keep]))
                continue
            for j in keep.nonzero()[:, 1].tolist():
                one = torch.zeros_like(keep)
                one[0, j] = True
                out.append((dict(X, _keep=one), y[one]))
    return out


def curvlinops_factors(
    model, batches, lik, fisher_type, kfac_approx, mc_samples=1, per_token=False
):
    """{trainable parameter name: (B, A)} from curvlinops, combined over sequences (see the
    module docstring); ``A`` is None for biases. ``per_token``: B from one operator per target
    token (A still from whole sequences)."""
    from curvlinops import KFACLinearOperator

    if per_token:
        seq = curvlinops_factors(model, batches, lik, fisher_type, kfac_approx, mc_samples)
        tok = _curvlinops_b_per_token(model, batches, lik, fisher_type, kfac_approx, mc_samples)
        return {n: (tok[n], seq[n][1]) for n in seq}

    wrapper = TargetLogits(model, lik)
    names = [n for n, _ in R.trainable(model)]
    params = [p for _, p in R.trainable(model)]
    owner = {}  # parameter data_ptr -> (module name in wrapper, "weight" | "bias")
    positions: dict[str, list[int]] = {}
    hooks = []
    for mname, mod in wrapper.named_modules():
        if isinstance(mod, nn.Linear) and any(p.requires_grad for p in mod.parameters()):
            for pname, p in mod.named_parameters(recurse=False):
                owner[p.data_ptr()] = (mname, pname)
            positions[mname] = []

            def pre(m, args, mname=mname):
                positions[mname].append(args[0].shape[1:-1].numel())

            hooks.append(mod.register_forward_pre_hook(pre))
    A_sum: dict[str, torch.Tensor] = {}
    w_sum: dict[str, float] = {}
    B_sum: dict[str, torch.Tensor] = {}
    for X, y in _sequences(batches, lik):
        if y.numel() == 0:
            continue
        for v in positions.values():
            v.clear()
        op = KFACLinearOperator(
            wrapper,
            nn.CrossEntropyLoss(reduction="sum"),
            params,
            [(X, y)],
            fisher_type=fisher_type,
            kfac_approx=kfac_approx,
            mc_samples=mc_samples,
            num_data=1,
            batch_size_fn=lambda X: X["input_ids"].shape[0],
            check_deterministic=False,
            progressbar=False,
        )
        for v in positions.values():
            v.clear()
        op.compute_kronecker_factors()
        sd = op.state_dict()
        for mname, A in sd["input_covariances"].items():
            w = float(positions[mname][0]) if kfac_approx == "expand" else 1.0
            A_sum[mname] = A_sum.get(mname, 0.0) + w * A
            w_sum[mname] = w_sum.get(mname, 0.0) + w
        for mname, B in sd["gradient_covariances"].items():
            B_sum[mname] = B_sum.get(mname, 0.0) + B
    for h in hooks:
        h.remove()
    out = {}
    for n, p in zip(names, params):
        mname, pname = owner[p.data_ptr()]
        A = A_sum[mname] / w_sum[mname] if pname == "weight" else None
        out[n] = (B_sum[mname], A)
    return out


def _curvlinops_b_per_token(model, batches, lik, fisher_type, kfac_approx, mc_samples):
    """{name: B} summed over one curvlinops operator per target token."""
    from curvlinops import KFACLinearOperator

    wrapper = TargetLogits(model, lik)
    named = R.trainable(model)
    params = [p for _, p in named]
    mapping = KFACLinearOperator.compute_parameter_mapping(params, wrapper)
    module_of = {pos: mname for mname, pp in mapping.items() for pos in pp.values()}
    B_sum: dict[str, torch.Tensor] = {}
    for X, y in _sequences(batches, lik, per_token=True):
        op = KFACLinearOperator(
            wrapper,
            nn.CrossEntropyLoss(reduction="sum"),
            params,
            [(X, y)],
            fisher_type=fisher_type,
            kfac_approx=kfac_approx,
            mc_samples=mc_samples,
            num_data=1,
            batch_size_fn=lambda X: X["input_ids"].shape[0],
            check_deterministic=False,
        )
        op.compute_kronecker_factors()
        for mname, B in op.state_dict()["gradient_covariances"].items():
            B_sum[mname] = B_sum.get(mname, 0.0) + B
    return {n: B_sum[module_of[i]] for i, (n, _) in enumerate(named)}


LORA_CASES = {
    "bert-cls": (lambda: M.bert_lora(ignore_one=False), "classification"),
    "gpt2-lm": (M.gpt2_lora, "causal_lm"),
    "llama-lm": (M.llama_lora, "causal_lm"),
}
FISHER = {"ggn": "type-2", "ef": "empirical"}


def _ours(model, batches, lik, backend, approx, **kw):
    lap = Laplace(model, lik, hessian_structure="kron", backend=backend, kfac_approx=approx, **kw)
    lap.fit(batches)
    return dict(zip(lap.param_names, lap.kron_factors()))


@pytest.mark.parametrize("name", list(LORA_CASES))
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("backend", ["ggn", "ef"])
def test_kron_factors_match_curvlinops_on_lora(name, approx, backend):
    builder, lik = LORA_CASES[name]
    model, batches = builder()
    per_token = lik == "causal_lm"  # each target token is its own data point (docstring)
    peer = curvlinops_factors(model, batches, lik, FISHER[backend], approx, per_token=per_token)
    ours = _ours(model, batches, lik, backend, approx)
    assert list(ours) == list(peer)
    for n in peer:
        (Bo, Ao), (Bp, Ap) = ours[n], peer[n]
        short = n.replace("base_model.model.", "")
        assert (Ao is None) == (Ap is None), f"{short}: input factor presence"
        if Ap is not None:
            R.assert_close(Ao, Ap, rtol=1e-9, what=f"{short}: A")
            R.assert_close(torch.kron(Bo, Ao), torch.kron(Bp, Ap), rtol=1e-8, what=f"{short}: B⊗A")
        R.assert_close(Bo, Bp, rtol=1e-8, what=f"{short}: B")


def test_kron_mc_agrees_with_curvlinops_mc_statistically():
    """MC draws cannot match draw for draw. In expectation both MC estimates of B are the
    per-token type-2 factor (independent targets per token have no token-token cross terms in
    expectation): the reference is one curvlinops type-2 operator per target token, summed.
    curvlinops' own *batched* type-2 B is not the MC limit for a causal LM (measured: its MC
    estimate stays 0.6 away from it at 200 samples). K-FAC-expand only, to keep the time."""
    model, batches = M.gpt2_lora()
    expect = curvlinops_factors(model, batches, "causal_lm", "type-2", "expand", per_token=True)
    peer = curvlinops_factors(model, batches, "causal_lm", "mc", "expand", mc_samples=32)
    ours = _ours(model, batches, "causal_lm", "ggn-mc", "expand", n_mc_samples=256, seed=0)
    for n in expect:
        Be, Bp, Bo = expect[n][0], peer[n][0], ours[n][0]
        e_peer = float(torch.linalg.norm(Bp - Be) / torch.linalg.norm(Be))
        e_ours = float(torch.linalg.norm(Bo - Be) / torch.linalg.norm(Be))
        assert e_peer < 0.35, f"{n}: curvlinops MC (32 samples) rel err {e_peer:.3f} (sanity)"
        assert e_ours < 0.2, f"{n}: ggn-mc (256 samples) B rel err {e_ours:.3f}"
        if expect[n][1] is not None:
            R.assert_close(ours[n][1], expect[n][1], rtol=1e-9, what=f"{n}: A")


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_curvlinops_helper_matches_one_batched_operator(approx):
    """The per-sequence combination equals one curvlinops operator on the whole data where
    curvlinops applies directly (no padding, no -100, equal lengths)."""
    from curvlinops import KFACLinearOperator

    model, batches = M.gpt2_lora(padded=False, ignore_one=False)
    combined = curvlinops_factors(model, batches, "causal_lm", "type-2", approx)
    wrapper = TargetLogits(model, "causal_lm")
    data = []
    for b in batches:
        X = {k: v for k, v in b.items() if k != "labels"}
        X["_keep"] = torch.ones_like(b["labels"][:, 1:], dtype=torch.bool)
        data.append((X, b["labels"][:, 1:].reshape(-1)))
    params = [p for _, p in R.trainable(model)]
    op = KFACLinearOperator(
        wrapper,
        nn.CrossEntropyLoss(reduction="sum"),
        params,
        data,
        fisher_type="type-2",
        kfac_approx=approx,
        batch_size_fn=lambda X: X["input_ids"].shape[0],
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    sd = op.state_dict()
    for n, (B, A) in combined.items():
        mname = "model." + n.rsplit(".", 1)[0]
        R.assert_close(B, sd["gradient_covariances"][mname], what=f"{n}: B")
        R.assert_close(A, sd["input_covariances"][mname], what=f"{n}: A")
