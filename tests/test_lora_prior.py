"""The LoRA-prior settings of the trainers and of ``marglik_training``.

- ``prior_application="decoupled"``: with SGD it is the same step as the prior in the loss (to
  rounding, in the trainer and in ``marglik_training``, hyper-updates included); with Adam it
  is ``torch.optim.AdamW`` with weight decay ``δ/N`` (to rounding); centred at ``θ₀`` with
  ``prior_mean="init"``.
- ``tie_lora_prior``: ``lora_A`` and ``lora_B`` of one adapter share a group; the tied
  hyper-gradient is the finite-difference gradient of the dense evidence in the tied
  precision; the learned per-tensor precisions are equal within each group.
- ``max_log_prior_step``: one update moves each ``log δ`` by at most the bound.
- ``freeze_lora_a``: A stays at its initialisation, B trains; the Laplace approximation is
  over B and the head and equals the dense GGN over exactly those tensors.
- Bad input is refused before training.
"""

from __future__ import annotations

import copy

import models as M
import pytest
import references as R
import torch
from test_trainer import MLP, _args, _mlp_data, _mlp_trainer

from hf_marglik import Laplace, MargLikTrainer, marglik_training
from hf_marglik.hyper import HyperOptimizer
from hf_marglik.lora import freeze_lora_a, lora_groups
from hf_marglik.prior import trainable_parameters


def _loader(n=24, batch=6):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
    data = torch.utils.data.TensorDataset(X, y)
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)


def _train(application, optimizer_cls, lr, n_epochs, burnin, **kw):
    model = MLP(seed=4).double()
    lap, model, margliks, losses = marglik_training(
        model,
        _loader(),
        optimizer_cls=optimizer_cls,
        optimizer_kwargs={"lr": lr},
        n_epochs=n_epochs,
        n_epochs_burnin=burnin,
        n_hypersteps=5,
        prior_prec_init=3.0,
        prior_application=application,
        **kw,
    )
    return model, margliks, losses


def test_decoupled_equals_the_loss_prior_with_sgd():
    """SGD: ``θ − lr(g + λθ)`` either way, hyper-updates after every epoch included."""
    ref, ref_ml, ref_losses = _train("loss", torch.optim.SGD, 0.3, 4, 1)
    dec, dec_ml, dec_losses = _train("decoupled", torch.optim.SGD, 0.3, 4, 1)
    for p, q in zip(dec.parameters(), ref.parameters()):
        R.assert_close(p, q, rtol=1e-11, what="parameters")
    R.assert_close(torch.tensor(dec_ml), torch.tensor(ref_ml), rtol=1e-11, what="margliks")
    R.assert_close(torch.tensor(dec_losses), torch.tensor(ref_losses), rtol=1e-11, what="losses")
    adam, _, _ = _train("loss", torch.optim.Adam, 0.05, 4, 1)
    adam_dec, _, _ = _train("decoupled", torch.optim.Adam, 0.05, 4, 1)
    gap = max(
        float((p - q).detach().abs().max())
        for p, q in zip(adam.parameters(), adam_dec.parameters())
    )
    assert gap > 1e-3  # with Adam the two differ


def test_decoupled_with_adam_is_adamw_at_the_prior_strength():
    """No hyper-update falls within training, so ``δ = 3`` throughout: decoupled Adam is
    ``AdamW(weight_decay=δ/N)`` on the mean cross-entropy."""
    with pytest.warns(UserWarning, match="no hyperparameter update"):
        ours, _, _ = _train("decoupled", torch.optim.Adam, 0.05, 3, 10)
    ref = MLP(seed=4).double()
    loader = _loader()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=3.0 / len(loader.dataset))
    for _ in range(3):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(x), y).backward()
            opt.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        R.assert_close(p, q, rtol=1e-11, what="AdamW reference")


@pytest.mark.parametrize("prior_mean", ["zero", "init"])
def test_trainer_decoupled_equals_the_loss_prior_with_sgd(tmp_path, prior_mean):
    kw = dict(optim="sgd", num_train_epochs=3, prior_prec_init=5.0, prior_mean=prior_mean)
    kw["max_grad_norm"] = 0.0  # clipping would clip the loss prior's gradient, not the decay
    ref = _mlp_trainer(tmp_path / "a", **kw)
    ref.train()
    dec = _mlp_trainer(tmp_path / "b", prior_application="decoupled", **kw)
    dec.train()
    assert dec.marglik_update_steps == ref.marglik_update_steps == [2, 4, 6]
    for p, q in zip(dec.model.parameters(), ref.model.parameters()):
        R.assert_close(p, q, rtol=1e-10, what="parameters")
    R.assert_close(torch.tensor(dec.margliks), torch.tensor(ref.margliks), rtol=1e-10)
    R.assert_close(torch.tensor(dec.losses), torch.tensor(ref.losses), rtol=1e-10)


# ---------------------------------------------------------------------- tied precisions
def _bert_names():
    model, batches = M.bert_lora()
    return model, batches, [n for n, _ in trainable_parameters(model)]


def test_lora_groups_tie_each_adapter():
    _, _, names = _bert_names()
    groups = lora_groups(names)
    by_name = dict(zip(names, groups))
    for n in names:
        if ".lora_A." in n:
            assert by_name[n] == by_name[n.replace(".lora_A.", ".lora_B.")]
    heads = [g for n, g in by_name.items() if "classifier" in n]
    assert len(heads) == 2 and len(set(heads)) == 1  # weight and bias of the head
    assert len(set(groups)) == 3  # query's adapter, value's adapter, the head
    with pytest.raises(ValueError, match="no trainable tensor is a LoRA factor"):
        lora_groups(["net.0.weight", "net.0.bias"])


def test_tied_hyper_gradient_matches_the_dense_evidence():
    """The tied parameter's gradient is the derivative of the dense evidence (exact GGN,
    full structure) in ``log δ_g``, by finite differences."""
    model, batches, names = _bert_names()
    groups = lora_groups(names)
    ref = R.dense_ggn(model, batches, "classification")
    lap = Laplace(model, "classification", hessian_structure="full", backend="ggn").fit(batches)
    hyper = HyperOptimizer(ref.sizes, "classification", tie_groups=groups, dtype=torch.float64)
    log_g = torch.tensor([0.3, -0.4, 1.1], dtype=torch.float64)
    with torch.no_grad():
        hyper.log_prior_prec.copy_(log_g)
    index = torch.tensor(groups)

    def dense(lg):
        prec = R.per_parameter(lg.exp()[index], ref.sizes)
        args = (ref.loss, "classification", ref.n_data, ref.n_outputs)
        return R.log_marglik(ref.H, ref.theta, prec, *args)

    R.assert_close(hyper.prior_precision, log_g.exp()[index], what="expanded precision")
    prec = hyper._expand(hyper.log_prior_prec.exp())
    lap.log_marginal_likelihood(prec).backward()
    R.assert_close(lap.log_marginal_likelihood(prec), dense(log_g), rtol=1e-10, what="lml")
    fd = R.finite_difference(dense, log_g)
    R.assert_close(hyper.log_prior_prec.grad, fd, rtol=1e-6, what="tied gradient")


def _bert_data(n=12):
    model, batches = M.bert_lora()
    rows = []
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            if int(b["labels"][i]) >= 0:
                rows.append({k: v[i] for k, v in b.items()})
    return model, M.DictDataset(rows[:n])


def test_trainer_ties_and_bounds_the_precisions(tmp_path):
    model, data = _bert_data()
    kw = dict(num_train_epochs=2, n_hypersteps=20, lr_hyp=0.5)
    tied = MargLikTrainer(
        model=model,
        args=_args(tmp_path, tie_lora_prior=True, max_log_prior_step=0.25, **kw),
        train_dataset=data,
    )
    tied.train()
    prec = dict(zip(tied._names, tied.marglik_loop.hyper.prior_precision.tolist()))
    for n, v in prec.items():
        if ".lora_A." in n:
            assert v == prec[n.replace(".lora_A.", ".lora_B.")]
    log_moves = (tied.marglik_loop.hyper.log_prior_prec.detach() - 0.0).abs()
    assert float(log_moves.max()) <= 2 * 0.25 + 1e-12  # two updates, each within the bound
    assert float(log_moves.max()) > 0.25 + 1e-6  # and the bound is what held them
    free_model, _ = _bert_data()
    free = MargLikTrainer(
        model=free_model, args=_args(tmp_path / "f", tie_lora_prior=True, **kw), train_dataset=data
    )
    free.train()
    assert float(free.marglik_loop.hyper.log_prior_prec.detach().abs().max()) > 0.5 + 1e-6


def test_trust_region_bounds_one_update():
    model, batches, names = _bert_names()
    lap = Laplace(model, "classification", hessian_structure="kron", backend="ggn").fit(batches)
    sizes = [p.numel() for _, p in trainable_parameters(model)]
    bounded = HyperOptimizer(
        sizes, "classification", lr_hyp=0.5, max_log_step=0.3, dtype=torch.float64
    )
    free = HyperOptimizer(sizes, "classification", lr_hyp=0.5, dtype=torch.float64)
    bounded.step(lap, 30)
    free.step(lap, 30)
    moved = bounded.log_prior_prec.detach().abs()
    assert float(moved.max()) <= 0.3 + 1e-12
    assert float(free.log_prior_prec.detach().abs().max()) > 0.3 + 1e-3
    with pytest.raises(ValueError, match="max_log_step=0"):
        HyperOptimizer(sizes, "classification", max_log_step=0.0)


# ---------------------------------------------------------------------- B-only adapters
def test_freeze_lora_a_laplace_is_the_dense_ggn_over_b_and_the_head():
    model, batches = M.bert_lora()
    frozen = freeze_lora_a(model)
    assert frozen and all(".lora_A." in n for n in frozen)
    names = [n for n, _ in trainable_parameters(model)]
    assert not any(".lora_A." in n for n in names) and any(".lora_B." in n for n in names)
    ref = R.dense_ggn(model, batches, "classification")
    prior = torch.linspace(0.5, 2.0, len(ref.sizes), dtype=torch.float64)
    lap = Laplace(
        model, "classification", hessian_structure="full", backend="ggn", prior_precision=prior
    ).fit(batches)
    expected = R.log_marglik(
        ref.H,
        ref.theta,
        R.per_parameter(prior, ref.sizes),
        ref.loss,
        "classification",
        ref.n_data,
        ref.n_outputs,
    )
    R.assert_close(lap.log_marginal_likelihood(), expected, rtol=1e-10, what="B-only evidence")


def test_trainer_freeze_lora_a_trains_b_only(tmp_path, caplog):
    model, data = _bert_data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with caplog.at_level("INFO", logger="hf_marglik.trainer"):
        trainer = MargLikTrainer(
            model=model, args=_args(tmp_path, freeze_lora_a=True), train_dataset=data
        )
    assert any("freeze_lora_a" in r.message for r in caplog.records)
    trainer.train()
    for n, p in model.named_parameters():
        if ".lora_A." in n:
            assert torch.equal(p, before[n]), n
        elif ".lora_B." in n:
            assert not torch.equal(p, before[n]), n
    assert not any(".lora_A." in n for n in trainer.laplace.param_names)


# ---------------------------------------------------------------------- bad input
def test_bad_lora_prior_settings_are_refused_before_training(tmp_path):
    for kw, match in [
        ({"tie_lora_prior": True}, "no trainable tensor is a LoRA factor"),
        ({"freeze_lora_a": True}, "no trainable lora_A factor"),
    ]:
        with pytest.raises(ValueError, match=match):
            _mlp_trainer(tmp_path, **kw)
    with pytest.raises(ValueError, match="weight_decay=0.1 would decay them a second time"):
        _args(tmp_path, prior_application="decoupled", weight_decay=0.1)
    with pytest.raises(ValueError, match="Set prior_structure='layerwise'"):
        _args(tmp_path, tie_lora_prior=True, prior_structure="scalar")
    with pytest.raises(ValueError, match="max_log_prior_step=-1"):
        _args(tmp_path, max_log_prior_step=-1.0)
    with pytest.raises(ValueError, match="prior_application"):
        _args(tmp_path, prior_application="adamw")
    model = MLP().double()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    trainer = MargLikTrainer(
        model=model,
        args=_args(tmp_path, prior_application="decoupled"),
        train_dataset=_mlp_data(),
        optimizers=(opt, None),
    )
    with pytest.raises(ValueError, match="optimizer passed to the trainer has weight_decay"):
        trainer.train()
    with pytest.raises(ValueError, match="optimizer_kwargs has weight_decay"):
        marglik_training(
            copy.deepcopy(model),
            _loader(),
            optimizer_kwargs={"weight_decay": 0.1},
            prior_application="decoupled",
        )
