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


def _nll(lap, data) -> float:
    batch = {k: torch.stack([d[k] for d in data.items]) for k in data.items[0]}
    probs = lap({"input_ids": batch["input_ids"]})
    return calibration_metrics(probs, batch["labels"])["nll"]


def test_gridsearch_predictive_prior(tmp_path):
    val = _data(24, 5)
    trainer = MargLikTrainer(
        model=_MLP().double(),
        args=tiny_trainer_args(
            tmp_path / "out", num_train_epochs=6, learning_rate=5e-2, predictive_prior="gridsearch"
        ),
        train_dataset=_data(32, 0),
        eval_dataset=val,
    )
    trainer.train()
    lap = trainer.laplace
    learned = trainer.marglik_loop.prior_precision
    assert torch.equal(lap.prior_precision, learned)  # the marginal likelihood's, unchanged
    tuned = lap.predictive_prior_precision
    k = tuned / learned
    torch.testing.assert_close(k, k[:1].expand_as(k), rtol=1e-12, atol=0)  # one factor
    grid = torch.logspace(-4, 4, 100, dtype=torch.float64)
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
    logs = [e for e in trainer.state.log_history if "predictive_prior_scale" in e]
    assert len(logs) == 1 and logs[0]["predictive_prior_scale"] == pytest.approx(float(k[0]))
    # the predictive uses the tuned prior; the marginal likelihood the learned one
    probe.predictive_prior_precision = None
    assert _nll(lap, val) == pytest.approx(min(nlls), rel=1e-12)
    assert float(lap.log_marginal_likelihood()) == pytest.approx(
        float(probe.log_marginal_likelihood()), rel=1e-14
    )
    # both are saved in the posterior file
    lap.save(tmp_path / "post.pt")
    loaded = Laplace.load(tmp_path / "post.pt", trainer.model)
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
