"""``hf_marglik.marglik_training`` and ``HyperOptimizer``: laplace-torch's numbers where it is
right, the closed-form evidence optimum on linear regression, and its faults fixed."""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hf_marglik.hyper import HyperOptimizer, count_data_points
from hf_marglik.marglik import backend_name, marglik_training
from hf_marglik.options import Backend, Likelihood


@pytest.fixture(autouse=True)
def _float64_one_thread():
    """Exactness needs float64; one thread is much faster for tiny models on a shared CPU."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def _mlp(n_in: int, n_out: int, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 5), nn.Tanh(), nn.Linear(5, n_out))


def _classification_data(n: int = 40):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, generator=g)
    return X, (X[:, 0] > 0).long() + (X[:, 1] > 0).long()


def _regression_data(n: int = 40):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 2, generator=g)
    y = X @ torch.tensor([1.0, -2.0]) + 0.3 * torch.randn(n, generator=g)
    return X, y.unsqueeze(-1)


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).reshape(-1), torch.as_tensor(b).reshape(-1)
    assert a.shape == b.shape
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


CASES = [
    # likelihood, hessian_structure, prior_structure, batch_size, extra
    ("classification", "kron", "layerwise", 40, {}),
    ("classification", "full", "scalar", 10, {}),
    ("classification", "diag", "diag", 40, {"scheduler": True}),
    ("regression", "full", "scalar", 40, {}),
    ("regression", "diag", "layerwise", 40, {}),
    # laplace-torch's KronLaplace has a wrong gradient in sigma_noise (autograd disagrees with
    # finite differences), so kron regression is compared with the noise fixed.
    ("regression", "kron", "layerwise", 40, {"fix_sigma_noise": True, "sigma_noise_init": 0.5}),
]


@pytest.mark.parametrize("likelihood,hessian,prior,batch_size,extra", CASES)
def test_matches_laplace_torch(likelihood, hessian, prior, batch_size, extra):
    """Plain MLP, deterministic batches: the same margliks, losses, precision, noise and
    parameters as laplace-torch's marglik_training."""
    import laplace
    from laplace.curvature import AsdlGGN

    X, y = _classification_data() if likelihood == "classification" else _regression_data()
    n_out = 3 if likelihood == "classification" else 1
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=False)
    extra = dict(extra)
    if extra.pop("scheduler", False):
        extra.update(
            scheduler_cls=torch.optim.lr_scheduler.StepLR, scheduler_kwargs={"step_size": 2}
        )
    kw = dict(
        likelihood=likelihood,
        hessian_structure=hessian,
        prior_structure=prior,
        n_epochs=5,
        n_hypersteps=3,
        marglik_frequency=2,
        optimizer_kwargs={"lr": 1e-2},
        **extra,
    )
    lap, model, margliks, losses = marglik_training(_mlp(X.shape[1], n_out), loader, **kw)
    theirs = _mlp(X.shape[1], n_out)
    lap_t, _, margliks_t, losses_t = laplace.marglik_training(theirs, loader, backend=AsdlGGN, **kw)

    assert len(margliks) == len(margliks_t) == 2 * 3
    assert _rel(margliks, margliks_t) < 1e-6
    assert _rel(losses, losses_t) < 1e-6
    assert _rel(lap.prior_precision, lap_t.prior_precision) < 1e-6
    assert _rel(lap.sigma_noise, lap_t.sigma_noise) < 1e-6
    for p, q in zip(model.parameters(), theirs.parameters()):
        assert _rel(p.detach(), q.detach()) < 1e-6
    assert _rel(lap.log_marginal_likelihood(), lap_t.log_marginal_likelihood()) < 1e-6


def test_linear_regression_reaches_evidence_optimum():
    """Bayesian linear regression: the Laplace evidence is exact, so marglik training must find
    the (α, σ) that maximise log N(y; 0, σ²I + XXᵀ/α), computed here in closed form."""
    g = torch.Generator().manual_seed(0)
    n, d = 50, 3
    X = torch.randn(n, d, generator=g)
    y = X @ (torch.randn(d, generator=g) / math.sqrt(2.0)) + 0.5 * torch.randn(n, generator=g)

    def log_evidence(h):
        cov = torch.exp(2 * h[1]) * torch.eye(n) + X @ X.T / torch.exp(h[0])
        return torch.distributions.MultivariateNormal(torch.zeros(n), cov).log_prob(y)

    h = torch.zeros(2, requires_grad=True)
    opt = torch.optim.LBFGS([h], max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -log_evidence(h)
        loss.backward()
        return loss

    opt.step(closure)
    alpha, sigma = h.detach().exp().tolist()

    torch.manual_seed(0)
    model = nn.Linear(d, 1, bias=False)
    lap, _, margliks, _ = marglik_training(
        model,
        DataLoader(TensorDataset(X, y.unsqueeze(-1)), batch_size=n),
        likelihood="regression",
        prior_structure="scalar",
        n_epochs=150,
        optimizer_kwargs={"lr": 0.1},
    )
    assert float(lap.prior_precision) == pytest.approx(alpha, rel=2e-2)
    assert float(lap.sigma_noise) == pytest.approx(sigma, rel=2e-2)
    assert -margliks[-1] == pytest.approx(float(log_evidence(h.detach())), rel=1e-3)


def test_beats_badly_chosen_weight_decay():
    """A 2-32-32-3 MLP on 40 noisy points: learned priors give a lower held-out NLL than a fixed
    weight decay chosen too small (overfits) or too large (underfits)."""
    g = torch.Generator().manual_seed(0)

    def data(n):
        X = torch.randn(n, 2, generator=g) * 1.5
        y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
        flip = torch.rand(n, generator=g) < 0.15
        return X, torch.where(flip, torch.randint(0, 3, (n,), generator=g), y)

    (Xtr, ytr), (Xte, yte) = data(40), data(500)

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
        )

    epochs = 150
    loader = DataLoader(TensorDataset(Xtr, ytr), batch_size=40)
    _, model, _, _ = marglik_training(
        mlp(), loader, n_epochs=epochs, optimizer_kwargs={"lr": 1e-2}, marglik_frequency=5
    )
    nll = F.cross_entropy(model(Xte), yte).item()
    for wd in (1e-4, 1.0):
        fixed = mlp()
        opt = torch.optim.Adam(fixed.parameters(), lr=1e-2, weight_decay=wd)
        for _ in range(epochs):
            opt.zero_grad()
            F.cross_entropy(fixed(Xtr), ytr).backward()
            opt.step()
        assert nll < F.cross_entropy(fixed(Xte), yte).item() - 0.05, wd


def test_backend_names():
    from laplace.curvature import AsdlEF, AsdlGGN, AsdlHessian, BackPackGGN, CurvlinopsEF

    assert backend_name(AsdlGGN) == Backend.GGN
    assert backend_name(BackPackGGN) == Backend.GGN
    assert backend_name(functools.partial(AsdlGGN, stochastic=True)) == Backend.GGN_MC
    assert backend_name(AsdlEF) == backend_name(CurvlinopsEF) == Backend.EF
    assert backend_name("ggn-mc") == Backend.GGN_MC
    with pytest.raises(ValueError, match="not supported"):
        backend_name(AsdlHessian)
    with pytest.raises(ValueError, match="choose one of"):
        backend_name("hessian")


class _DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(3, 6)
        self.frozen.requires_grad_(False)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(6, 3)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.drop.training)
        return self.head(self.drop(torch.tanh(self.frozen(x))))


def test_train_mode_kept_and_only_trainable_parameters():
    """laplace-torch leaves the model in eval mode after the first fit (dropout off from then
    on) and copies the frozen weights; here every training forward runs in train mode, frozen
    parameters are untouched and optimizer_kwargs is not modified."""
    X, y = _classification_data()
    net = _DropoutNet()
    frozen = net.frozen.weight.detach().clone()
    head = net.head.weight.detach().clone()
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    with pytest.warns(UserWarning, match="Weight decay"):
        lap, model, margliks, losses = marglik_training(
            net, DataLoader(TensorDataset(X, y), batch_size=20), n_epochs=3, optimizer_kwargs=kwargs
        )
    assert kwargs == {"lr": 1e-2, "weight_decay": 0.1}
    assert model.training
    assert lap.n_params == net.head.weight.numel() + net.head.bias.numel()
    assert len(losses) == 3 and len(margliks) == 30
    # forwards outside the Laplace fits (which run in eval mode) are all in train mode
    assert sum(net.modes) == 3 * 2
    assert torch.equal(net.frozen.weight, frozen)
    assert not torch.equal(net.head.weight, head)


class _TinyLM(nn.Module):
    def __init__(self, vocab: int = 7):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, 4)
        self.emb.requires_grad_(False)
        self.out = nn.Linear(4, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.emb(input_ids))


def test_causal_lm_counts_target_tokens():
    """N counts target tokens (shifted, -100 and padding excluded), not sequences."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (6, 5), generator=g)
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[0, -2:] = 0
    labels = ids.clone()
    labels[1, 2] = -100
    batches = [
        {
            "input_ids": ids[i : i + 3],
            "attention_mask": mask[i : i + 3],
            "labels": labels[i : i + 3],
        }
        for i in (0, 3)
    ]
    n_tokens = 6 * 4 - 2 - 1
    assert count_data_points(batches, Likelihood.CAUSAL_LM, "input_ids", "labels") == n_tokens
    lap, model, _, losses = marglik_training(
        _TinyLM(), batches, likelihood="causal_lm", n_epochs=2, n_hypersteps=2
    )
    assert lap.n_data == n_tokens
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_kron_with_diagonal_prior():
    """laplace-torch raises for hessian_structure='kron' with prior_structure='diag'."""
    X, y = _classification_data()
    lap, _, margliks, _ = marglik_training(
        _mlp(3, 3),
        DataLoader(TensorDataset(X, y), batch_size=40),
        prior_structure="diag",
        n_epochs=2,
        n_hypersteps=2,
    )
    assert lap.prior_precision.numel() == lap.n_params
    assert all(math.isfinite(v) for v in margliks)


def test_bad_inputs():
    X, y = _classification_data()
    loader = DataLoader(TensorDataset(X, y), batch_size=40)
    with pytest.raises(ValueError, match="marglik_frequency"):
        marglik_training(_mlp(3, 3), loader, marglik_frequency=-1)
    with pytest.raises(ValueError, match="prior_prec_init"):
        marglik_training(_mlp(3, 3), loader, prior_prec_init=0.0)
    with pytest.raises(ValueError, match="likelihood"):
        marglik_training(_mlp(3, 3), loader, likelihood="poisson")
    frozen = _mlp(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        marglik_training(frozen, loader)
    no_labels = [{"input_ids": X, "y": y}]
    with pytest.raises(KeyError, match="dict_key_y"):
        marglik_training(_mlp(3, 3), no_labels, n_epochs=1)
    with pytest.warns(UserWarning, match="n_epochs_burnin"):
        marglik_training(_mlp(3, 3), loader, n_epochs=1, n_epochs_burnin=3)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_online_curvature_equals_the_pass_when_parameters_stay(likelihood):
    """marglik_curvature='online' with a budget of one extra backward per step: at lr 0 with the
    empirical Fisher (no sampling, no dropout) the epoch's online curvature is the pass's, so
    every hyper-step, the learned hyperparameters and the returned posterior agree."""
    X, y = _classification_data() if likelihood == "classification" else _regression_data()
    loader = DataLoader(TensorDataset(X, y), batch_size=10)  # 4 steps per epoch
    out = {}
    for mode in ("fit", "online"):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*online curvature sampled no step")
            lap, _, margliks, losses = marglik_training(
                _mlp(X.shape[1], 3 if likelihood == "classification" else 1),
                loader,
                likelihood=likelihood,
                backend="ef",
                optimizer_kwargs={"lr": 0.0},
                n_epochs=3,
                marglik_curvature=mode,
                marglik_budget=1.0,
            )
        out[mode] = (lap, margliks, losses)
    (lap_f, ml_f, loss_f), (lap_o, ml_o, loss_o) = out["fit"], out["online"]
    assert len(ml_o) == len(ml_f) == 30
    torch.testing.assert_close(torch.tensor(ml_o), torch.tensor(ml_f), rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.tensor(loss_o), torch.tensor(loss_f), rtol=1e-12, atol=0)
    torch.testing.assert_close(lap_o.prior_precision, lap_f.prior_precision, rtol=1e-10, atol=0)
    torch.testing.assert_close(lap_o.curvature_dense(), lap_f.curvature_dense(), rtol=1e-10, atol=0)
    torch.testing.assert_close(lap_o.sigma_noise, lap_f.sigma_noise, rtol=1e-10, atol=0)


def test_online_curvature_samples_every_kth_step_and_checks_its_settings():
    """Budget 1/3 samples every 2nd step: the update's curvature is that of batches 2 and 4,
    rescaled to N (lr 0, empirical Fisher); bad settings are refused before training."""
    X, y = _classification_data()
    loader = DataLoader(TensorDataset(X, y), batch_size=10)
    lap, _, _, _ = marglik_training(
        _mlp(3, 3),
        loader,
        backend="ef",
        optimizer_kwargs={"lr": 0.0},
        n_epochs=1,
        marglik_curvature="online",
        marglik_budget=1 / 3,
    )
    from hf_marglik import Laplace

    sampled = [(X[10:20], y[10:20]), (X[30:40], y[30:40])]
    ref = Laplace(_mlp(3, 3), "classification", backend="ef").fit(sampled, n_data=40)
    torch.testing.assert_close(lap.curvature_dense(), ref.curvature_dense(), rtol=1e-10, atol=0)
    torch.testing.assert_close(lap.loss, ref.loss, rtol=1e-12, atol=0)
    for bad, match in ((0.0, "marglik_budget"), (1.5, "marglik_budget")):
        with pytest.raises(ValueError, match=match):
            marglik_training(_mlp(3, 3), loader, marglik_curvature="online", marglik_budget=bad)
    with pytest.raises(ValueError, match="marglik_curvature"):
        marglik_training(_mlp(3, 3), loader, marglik_curvature="sometimes")


# ---------------------------------------------------------------------- HyperOptimizer
def test_hyper_initial_values_and_shapes():
    sizes = [6, 3, 4]
    for structure, n in [("scalar", 1), ("layerwise", 3), ("diag", 13)]:
        h = HyperOptimizer(sizes, "classification", structure, prior_prec_init=2.0, temperature=3.0)
        assert h.prior_precision.shape == (n,)
        assert torch.allclose(h.prior_precision, torch.full((n,), 6.0))
        assert float(h.sigma_noise) == 1.0 and not h.learns_sigma
    h = HyperOptimizer(sizes, "regression", sigma_noise_init=0.5, temperature=2.0)
    assert h.learns_sigma and float(h.sigma_noise) == pytest.approx(0.5)
    assert h.crit_factor == pytest.approx(2.0 / (2 * 0.25))
    params = [torch.ones(6), torch.ones(3), torch.ones(4)]
    prior = h.prior_term(params)
    assert float(prior) == pytest.approx(0.5 * 2.0 * 13 / h.crit_factor)
    fixed = HyperOptimizer(sizes, "regression", sigma_noise_init=0.5, fix_sigma_noise=True)
    assert not fixed.learns_sigma and float(fixed.sigma_noise) == pytest.approx(0.5)


class _FakeLaplace:
    """log p(D) = f(δ, σ), to drive the hyper-optimizer without a model."""

    def __init__(self, fn):
        self.fn = fn

    def log_marginal_likelihood(self, prior_precision, sigma_noise=None):
        return self.fn(prior_precision, sigma_noise)


def test_hyper_step_skips_non_finite_and_keeps_values():
    h = HyperOptimizer([2, 2], "classification")
    before = h.state_dict()
    with pytest.warns(RuntimeWarning, match="Skipping"):
        values = h.step(_FakeLaplace(lambda p, s: p.sum() * float("nan")), 5)
    assert values == []
    assert torch.equal(h.log_prior_prec.detach(), before["log_prior_prec"])

    # a step that overflows exp(log δ): rejected, previous values and Adam state kept
    h = HyperOptimizer([2, 2], "classification", lr_hyp=1e3)
    with torch.no_grad():
        h.log_prior_prec.fill_(700.0)
    before = h.state_dict()
    with pytest.warns(RuntimeWarning, match="0 or infinite"):
        values = h.step(_FakeLaplace(lambda p, s: torch.log(p).sum()), 5)
    assert len(values) == 1 and math.isfinite(values[0])
    assert torch.equal(h.log_prior_prec.detach(), before["log_prior_prec"])
    assert h.optimizer.state_dict()["state"] == {}
    assert torch.isfinite(h.prior_precision).all()


def test_hyper_state_dict_round_trip_continues_identically():
    def objective(p, s):
        return -((torch.log(p) - torch.tensor([1.0, -1.0])) ** 2).sum() - (torch.log(s) - 0.3) ** 2

    a = HyperOptimizer([3, 2], "regression")
    lap = _FakeLaplace(objective)
    a.step(lap, 4)
    b = HyperOptimizer([3, 2], "regression")
    b.load_state_dict(a.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        va, vb = a.step(lap, 3), b.step(lap, 3)
    assert va == vb
    assert torch.equal(a.prior_precision, b.prior_precision)
    assert torch.equal(a.sigma_noise, b.sigma_noise)
    assert torch.equal(a.evaluated_prior_precision, b.evaluated_prior_precision)
