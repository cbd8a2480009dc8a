"""``predictive_prior='gridsearch'``: after training, the predictive's prior precision is the
learned one times the factor with the lowest predictive NLL on the eval split; the learned
precisions stay the marginal likelihood's, and both are saved in the posterior file."""

from __future__ import annotations

import pytest
import torch
from models import DictDataset, tiny_trainer_args
from torch import nn

from hf_marglik import Laplace, MargLikTrainer, MargLikTrainingArguments, calibration_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, input_ids):
        return self.net(input_ids)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    return DictDataset([{"input_ids": X[i], "labels": y[i]} for i in range(n)])


def _noisy(n, seed, fraction):
    """:func:`_data` with about ``fraction`` of the labels moved to the next class: validation
    data on which the trained MAP is overconfident, so that posterior variance helps."""
    g = torch.Generator().manual_seed(seed + 100)
    items = []
    for item in _data(n, seed).items:
        item = dict(item)
        if float(torch.rand(1, generator=g)) < fraction:
            item["labels"] = (item["labels"] + 1) % 3
        items.append(item)
    return DictDataset(items)


def _trained(tmp_path, val, **kw):
    trainer = MargLikTrainer(
        model=_MLP().double(),
        args=tiny_trainer_args(
            tmp_path / "out",
            num_train_epochs=6,
            learning_rate=5e-2,
            predictive_prior="gridsearch",
            **kw,
        ),
        train_dataset=_data(32, 0),
        eval_dataset=val,
    )
    trainer.train()
    return trainer


def _batch(data):
    return {k: torch.stack([d[k] for d in data.items]) for k in data.items[0]}


def _map_probs(model, data):
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(_batch(data)["input_ids"]), dim=-1)


def _nll(lap, data) -> float:
    batch = {k: torch.stack([d[k] for d in data.items]) for k in data.items[0]}
    probs = lap({"input_ids": batch["input_ids"]})
    return calibration_metrics(probs, batch["labels"])["nll"]


def test_gridsearch_predictive_prior(tmp_path):
    val = _noisy(24, 5, 0.3)
    trainer = _trained(tmp_path, val)
    lap = trainer.laplace
    learned = trainer.marglik_loop.prior_precision
    assert torch.equal(lap.prior_precision, learned)  # the marginal likelihood's, unchanged
    tuned = lap.predictive_prior_precision
    k = tuned / learned
    torch.testing.assert_close(k, k[:1].expand_as(k), rtol=1e-12, atol=0)  # one factor
    grid = torch.logspace(-4, 4, 100).double()  # laplace-torch's grid: float32 values
    assert torch.isclose(grid, k[0]).any()
    # the factor is the grid's argmin of the validation NLL
    probe = Laplace(trainer.model, "classification")
    probe.load_state_dict(lap.state_dict())
    nlls = []
    for g in grid:
        probe.predictive_prior_precision = learned * g
        nlls.append(_nll(probe, val))
    assert float(grid[int(torch.tensor(nlls).argmin())]) == pytest.approx(float(k[0]), rel=1e-12)
    assert min(nlls) <= nlls[-1] + 1e-12 and min(nlls) <= nlls[0] + 1e-12
    # the MAP, the grid's limit, was a candidate and lost
    map_nll = calibration_metrics(_map_probs(trainer.model, val), _batch(val)["labels"])["nll"]
    assert map_nll > min(nlls) + 1e-3
    logs = [e for e in trainer.state.log_history if "predictive_prior_scale" in e]
    assert len(logs) == 1 and logs[0]["predictive_prior_scale"] == pytest.approx(float(k[0]))
    # the predictive uses the tuned prior; the marginal likelihood the learned one
    probe.predictive_prior_precision = None
    assert _nll(lap, val) == pytest.approx(min(nlls), rel=1e-12)
    assert float(lap.log_marginal_likelihood()) == pytest.approx(
        float(probe.log_marginal_likelihood()), rel=1e-14
    )
    # both are saved in the posterior file
    lap.save_pretrained(tmp_path / "post")
    loaded = Laplace.from_pretrained(tmp_path / "post", trainer.model)
    assert torch.equal(loaded.prior_precision, learned)
    assert torch.equal(loaded.predictive_prior_precision, tuned)
    assert _nll(loaded, val) == _nll(lap, val)


def test_gridsearch_predictive_prior_bad_input(tmp_path):
    with pytest.raises(ValueError, match="pass an eval_dataset"):
        MargLikTrainer(
            model=_MLP().double(),
            args=tiny_trainer_args(tmp_path, predictive_prior="gridsearch"),
            train_dataset=_data(8, 0),
        )
    with pytest.raises(ValueError, match="likelihood='causal_lm'"):
        MargLikTrainingArguments(
            output_dir=str(tmp_path), likelihood="causal_lm", predictive_prior="gridsearch"
        )
    with pytest.raises(ValueError, match="predictive_prior='best' is not valid"):
        MargLikTrainingArguments(output_dir=str(tmp_path), predictive_prior="best")


def test_gridsearch_predictive_prior_chooses_the_map_where_validation_prefers_it(
    tmp_path, monkeypatch
):
    """On clean validation labels the trained MAP beats every grid value (the Laplace predictive
    only softens it): the predictive prior is inf everywhere and the predictive is the MAP's to
    the last digit, without a Jacobian, for every predictive; saved and loaded as such."""
    val = _data(24, 5)
    trainer = _trained(tmp_path, val)
    lap, model = trainer.laplace, trainer.model
    assert torch.isposinf(lap.predictive_prior_precision).all()
    assert torch.isfinite(lap.prior_precision).all()  # the marginal likelihood's, unchanged
    logs = [e for e in trainer.state.log_history if "predictive_prior_scale" in e]
    assert len(logs) == 1 and logs[0]["predictive_prior_scale"] == float("inf")
    # the MAP's validation NLL is below every grid value's
    probe = Laplace(model, "classification")
    probe.load_state_dict(lap.state_dict())
    map_probs = _map_probs(model, val)
    map_nll = calibration_metrics(map_probs, _batch(val)["labels"])["nll"]
    grid = []
    for g in torch.logspace(-4, 4, 100, dtype=torch.float64):
        probe.predictive_prior_precision = lap.prior_precision * g
        grid.append(_nll(probe, val))
    assert map_nll < min(grid)
    # the predictive is the MAP's, exactly, and needs no Jacobian
    monkeypatch.setattr(Laplace, "output_jacobians", lambda *a: pytest.fail("Jacobians"))
    x = {"input_ids": _batch(val)["input_ids"]}
    for kw in ({}, {"link_approx": "mc"}, {"pred_type": "nn", "n_samples": 3}):
        assert torch.equal(lap(x, **kw), map_probs), kw
    samples = lap.predictive_samples(x, n_samples=4)
    assert samples.shape == (4, *map_probs.shape) and torch.equal(samples[3], map_probs)
    # saved and loaded as the MAP limit
    lap.save_pretrained(tmp_path / "post")
    loaded = Laplace.from_pretrained(tmp_path / "post", model)
    assert torch.isposinf(loaded.predictive_prior_precision).all()
    assert torch.equal(loaded(x), map_probs)


def test_the_map_limit_is_all_or_nothing_and_not_the_bridges(tmp_path):
    """inf is accepted only for every precision at once (a partial point mass is refused); the
    Laplace bridge, whose limit is not the MAP's, gets no MAP candidate."""
    from hf_marglik.tuning import tune_predictive_prior

    trainer = _trained(tmp_path, _data(24, 5))
    lap = trainer.laplace
    n = lap.prior_precision.numel()
    for bad in (torch.tensor([float("inf")] + [1.0] * (n - 1)), torch.full((n,), float("nan"))):
        with pytest.raises(ValueError, match="inf everywhere"):
            lap.predictive_prior_precision = bad
    with pytest.raises(ValueError, match="positive and finite"):
        lap.prior_precision = float("inf")
    loader = trainer.get_eval_dataloader(trainer.eval_dataset)
    for link, limit in (("probit", True), ("bridge_norm", False)):
        scale = tune_predictive_prior(lap, loader, link_approx=link)
        assert (scale == float("inf")) == limit, link
