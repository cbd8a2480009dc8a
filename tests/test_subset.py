"""Weighted curvature fits and curvature-weighted subsets (``hf_marglik/subset.py``).

The exact reference for a weighted fit is the fit on repeated data: an integer weight ``w_n``
must equal example ``n`` repeated ``w_n`` times (0: left out), to rounding, for every structure
and likelihood. The sampling design is checked against its definition and for unbiasedness."""

from __future__ import annotations

import math

import models as M
import pytest
import references as R
import torch

from hf_marglik import Laplace
from hf_marglik import subset as S

WEIGHTS = [2, 1, 0, 3, 1, 1]


def _rows(batch, idx):
    if isinstance(batch, dict):
        return {k: v[idx] for k, v in batch.items()}
    return tuple(v[idx] for v in batch)


def _weighted_and_repeated(batches):
    """Per-example integer weights (cycling WEIGHTS), and the batches with every example
    repeated that many times."""
    weights, repeated, k = {}, [], 0
    for b in batches:
        n = (b["labels"] if isinstance(b, dict) else b[1]).shape[0]
        w = torch.tensor([WEIGHTS[(k + i) % len(WEIGHTS)] for i in range(n)], dtype=torch.float64)
        k += n
        weights[id(b)] = w
        idx = torch.repeat_interleave(torch.arange(n), w.long())
        repeated.append(_rows(b, idx))
    return weights, repeated


CASES = {
    "bert-kron-expand": (lambda: M.bert_lora(), "classification", dict(kfac_approx="expand")),
    "bert-kron-reduce": (lambda: M.bert_lora(), "classification", dict(kfac_approx="reduce")),
    "bert-full": (lambda: M.bert_lora(), "classification", dict(hessian_structure="full")),
    "gpt2-kron": (lambda: M.gpt2_lora(), "causal_lm", {}),
    "gpt2-diag": (lambda: M.gpt2_lora(), "causal_lm", dict(hessian_structure="diag")),
    "mlp-regression-kron": (lambda: M.mlp_regression(), "regression", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_integer_weights_equal_repeated_examples(case):
    build, likelihood, kw = CASES[case]
    model, batches = build()
    weights, repeated = _weighted_and_repeated(batches)
    lap_w = Laplace(model, likelihood, prior_structure="layerwise", **kw)
    lap_w.fit(batches, example_weights=lambda b: weights[id(b)])
    lap_r = Laplace(model, likelihood, prior_structure="layerwise", **kw)
    lap_r.fit(repeated)
    assert lap_w.n_data == lap_r.n_data
    R.assert_close(lap_w.loss, lap_r.loss, what="weighted loss")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        prec = torch.rand(lap_w.n_layers, generator=g, dtype=torch.float64) * 3 + 0.1
        R.assert_close(
            lap_w.log_marginal_likelihood(prec),
            lap_r.log_marginal_likelihood(prec),
            rtol=1e-9,
            what="log marginal likelihood",
        )


def test_unit_weights_change_nothing():
    model, batches = M.bert_lora()
    plain = Laplace(model, "classification").fit(batches)
    ones = Laplace(model, "classification").fit(
        batches, example_weights=lambda b: torch.ones(b["labels"].shape[0])
    )
    assert plain.n_data == ones.n_data
    R.assert_close(ones.log_marginal_likelihood(), plain.log_marginal_likelihood(), rtol=1e-12)


@pytest.mark.parametrize("bad", ["negative", "nan", "count"])
def test_bad_weights_are_refused(bad):
    model, batches = M.bert_lora()

    def weights(batch):
        w = torch.ones(batch["labels"].shape[0] + (bad == "count"))
        w[1] = {"negative": -1.0, "nan": float("nan"), "count": 1.0}[bad]
        return w

    with pytest.raises(ValueError, match="example_weights"):
        Laplace(model, "classification").fit(batches, example_weights=weights)


def test_row_keys_ignore_padding():
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    k_padded = S.row_keys(ids, mask)
    assert k_padded[0] == S.row_keys(torch.tensor([[5, 6, 7]]))[0]
    assert k_padded[0] != k_padded[1]
    assert (
        S.example_key({"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}, "input_ids")
        == (k_padded[0])
    )
    assert S.example_key({"pixel_values": [0.1]}, "input_ids") is None
    assert S.example_key({"input_ids": "some text"}, "input_ids") is None
    x = torch.randn(3, 4, dtype=torch.float64)  # float features: keyed by their raw values
    assert S.row_keys(x) == [S.example_key({"x": x[i]}, "x") for i in range(3)]
    assert len(set(S.row_keys(x))) == 3


def test_inclusion_probabilities():
    scores = torch.tensor([10.0, 0.0, 1.0, 1.0, 2.0, 0.5, 0.0, 3.0])
    pi = S.inclusion_probabilities(scores, expected=3.0)
    assert math.isclose(float(pi.sum()), 3.0, rel_tol=1e-12)
    assert float(pi.max()) == 1.0 and float(pi[0]) == 1.0  # the largest is capped, certain
    assert bool((pi > 0).all())  # the floor: every example can be drawn
    x = scores + S.FLOOR * scores.mean()
    free = pi < 1
    ratio = pi[free] / x[free]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-12)  # proportional
    assert bool((S.inclusion_probabilities(scores, expected=8.0) == 1).all())


def test_horvitz_thompson_sum_is_unbiased():
    """Σ_drawn x_n / π_n averages to Σ x_n over draws (any π); with π ∝ x its spread is far
    smaller than a uniform design's of the same expected size."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.full((90,), 0.01), torch.linspace(0.5, 2.0, 10)]).double()
    truth = float(x.sum())
    designs = {
        "curvature": S.inclusion_probabilities(x, expected=15.0),
        "uniform": torch.full((100,), 0.15, dtype=torch.float64),
    }
    spread = {}
    for name, pi in designs.items():
        est = []
        for _ in range(4000):
            idx, w = S.draw(pi, g)
            est.append(sum(float(x[i]) * wi for i, wi in zip(idx, w)))
        est = torch.tensor(est)
        se = float(est.std()) / math.sqrt(len(est))
        assert abs(float(est.mean()) - truth) < 4 * se, name
        spread[name] = float(est.std())
    assert spread["curvature"] < 0.2 * spread["uniform"]


# ---------------------------------------------------------------------- MargLikTrainer
def _bert_trainer(tmp_path, **kw):
    from hf_marglik import MargLikTrainer

    model, batches = M.bert_lora(n_batches=4, batch=4, seq=6, layers=1)
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(4)]
    for i, r in enumerate(rows):  # variable padding, valid labels
        r["attention_mask"][6 - (i % 3) :] = 0
        r["labels"] = torch.tensor(i % 3)
    args = M.tiny_trainer_args(tmp_path / "out", num_train_epochs=2, **kw)
    return MargLikTrainer(model=model, args=args, train_dataset=M.DictDataset(rows))


def test_trainer_draws_weighted_subsets_from_recorded_curvature(tmp_path):
    trainer = _bert_trainer(tmp_path, marglik_subset=0.5, restore_best_marglik=False)
    assert trainer.args.marglik_subset_sampling == "curvature"  # the classification default
    trainer.train()
    cs = trainer._curvature_subset
    keys = cs.keys()
    assert len(set(keys)) == 16 and set(cs.scores) == set(keys)  # every example recorded
    assert all(0.0 <= v <= 1.0 for v in cs.scores.values())
    # the last fit is the one drawn at the last step: refit it directly and compare
    dataset, weights = cs.draw_subset(trainer.state.global_step)
    assert 0 < len(dataset) < 16
    lap = Laplace(trainer.model, "classification", prior_precision=trainer.laplace.prior_precision)
    lap.fit(trainer.get_test_dataloader(dataset), n_data=16, example_weights=weights)
    R.assert_close(
        lap.log_marginal_likelihood(), trainer.laplace.log_marginal_likelihood(), rtol=1e-10
    )
    state = trainer._state_dict()["subset_scores"]
    restored = S.CurvatureSubset(trainer.train_dataset, 0.5, "input_ids", 0)
    restored.load_state_dict(state)
    assert restored.scores == cs.scores


def test_subset_sampling_options(tmp_path):
    args = M.tiny_trainer_args(tmp_path, likelihood="regression", marglik_subset=0.5)
    assert args.marglik_subset_sampling == "uniform"
    with pytest.raises(ValueError, match="marglik_subset_sampling='curvature' needs likelihood"):
        M.tiny_trainer_args(tmp_path, likelihood="regression", marglik_subset_sampling="curvature")
    with pytest.raises(ValueError, match="marglik_subset_sampling='random' is not valid"):
        M.tiny_trainer_args(tmp_path, marglik_subset_sampling="random")
    uniform = _bert_trainer(tmp_path, marglik_subset=0.5, marglik_subset_sampling="uniform")
    uniform.train()
    assert uniform._curvature_subset is None and len(uniform._fit_dataset) == 8


def test_resume_mid_epoch_restores_recorded_curvature(tmp_path):
    """A run resumed from a checkpoint in the middle of epoch 2 ends with exactly the
    hyperparameters of the uninterrupted run: the curvature recorded in the first half of the
    epoch (which the resumed run does not see again before the epoch's fit) comes back with the
    checkpoint; without it the subset drawn at the end of epoch 2 would differ."""
    kw = dict(
        marglik_subset=0.5,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=6,
        restore_best_marglik=False,
    )
    full = _bert_trainer(tmp_path / "full", **kw)
    full.train()
    ckpt = tmp_path / "full" / "out" / "checkpoint-6"  # 4 steps per epoch: mid epoch 2
    assert (ckpt / "marglik_state.pt").is_file()
    resumed = _bert_trainer(tmp_path / "resumed", **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed._curvature_subset.scores == full._curvature_subset.scores
    expected = torch.tensor(full.hyperparameters()["prior_precision"])
    got = torch.tensor(resumed.hyperparameters()["prior_precision"])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    state = torch.load(ckpt / "marglik_state.pt", weights_only=True)
    assert state["subset_scores"]["keys"].numel() == 16
