"""The curvature gathered during training (``marglik_curvature="online"``, hf_marglik.online)
against a curvature pass, where the two must agree exactly: with a learning rate of 0 (the
parameters of the window are the update's), no dropout, and the empirical Fisher (the labels are
the observed ones), the online factors and loss equal a fit over the sampled examples."""

from __future__ import annotations

import pytest
import torch
from models import DictDataset, tiny_trainer_args
from torch import nn

from hf_marglik import Laplace, MargLikTrainer, MargLikTrainingArguments
from hf_marglik.online import EXTRA_BACKWARD_COST, interval_for_budget

pytestmark = pytest.mark.usefixtures("one_thread")


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, input_ids):
        return self.net(input_ids)


def _data(n=24):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return DictDataset([{"input_ids": X[i], "labels": y[i]} for i in range(n)])


class _Capture:
    """Records the fit of every update (the loop's ``laplace`` right after it)."""

    def __init__(self):
        self.fits = []


def _trainer(tmp_path, callbacks=(), **kw):
    kw = {"learning_rate": 0.0, "backend": "ef", "num_train_epochs": 2, **kw}
    return MargLikTrainer(
        model=_MLP().double(),
        args=tiny_trainer_args(tmp_path / "out", marglik_curvature="online", **kw),
        train_dataset=_data(),
        callbacks=list(callbacks),
    )


def _sampled_examples(trainer, every: int) -> list[int]:
    """The indices of the training examples of every ``every``-th optimizer step of epoch 1
    (the Trainer's own shuffled order)."""
    order = [i for batch in trainer.get_train_dataloader().batch_sampler for i in batch]
    bs = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    steps = [order[k : k + bs] for k in range(0, len(order), bs)]
    return [i for s, idx in enumerate(steps) if (s + 1) % every == 0 for i in idx]


@pytest.mark.parametrize("every,accumulation", [(1, 1), (2, 1), (1, 2)])
def test_online_equals_a_fit_over_the_sampled_examples(tmp_path, every, accumulation):
    """lr 0, empirical Fisher: the first update's online curvature and loss equal a fit over
    the examples of the sampled steps rescaled to N (every step, every 2nd step, and with
    gradient accumulation)."""
    budget = EXTRA_BACKWARD_COST / every
    trainer = _trainer(
        tmp_path,
        num_train_epochs=1,
        marglik_budget=budget,
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
        restore_best_marglik=False,
    )
    torch.manual_seed(0)
    sampler_state = torch.random.get_rng_state()
    trainer.train()
    assert trainer._online.every == every
    lap = trainer.laplace  # the update's fit, reused at the end (the last update, same params)
    torch.random.set_rng_state(sampler_state)
    idx = _sampled_examples(trainer, every)
    data = trainer.train_dataset
    ref = Laplace(
        trainer.model, "classification", backend="ef", prior_precision=lap.prior_precision
    )
    loader = trainer.get_test_dataloader(DictDataset([data[i] for i in idx]))
    ref.fit(loader, n_data=len(data))
    assert lap.n_data == ref.n_data == 24
    torch.testing.assert_close(lap.loss, ref.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(lap.curvature_dense(), ref.curvature_dense(), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(
        lap.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-12, atol=0
    )


def test_online_resume_mid_window_equals_uninterrupted(tmp_path):
    """A checkpoint in the middle of a window holds the window's running sums."""
    full = _trainer(tmp_path / "a", learning_rate=1e-2, backend="ggn-mc", num_train_epochs=2)
    full.args.save_strategy, full.args.save_steps = "steps", 1
    full.train()
    resumed = _trainer(tmp_path / "a", learning_rate=1e-2, backend="ggn-mc", num_train_epochs=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    assert resumed.margliks == full.margliks
    assert torch.equal(resumed.laplace.prior_precision, full.laplace.prior_precision)
    torch.testing.assert_close(
        resumed.laplace.curvature_dense(), full.laplace.curvature_dense(), rtol=0, atol=0
    )


def test_interval_for_budget():
    assert interval_for_budget(1.0) == 1
    assert interval_for_budget(EXTRA_BACKWARD_COST) == 1
    assert interval_for_budget(0.25) == 3  # 3 steps: 2/9 of the training compute
    assert interval_for_budget(EXTRA_BACKWARD_COST / 4) == 4
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="marglik_budget"):
            interval_for_budget(bad)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(marglik_curvature="fit", marglik_budget=0.5), "set marglik_curvature='online'"),
        (dict(marglik_curvature="online", marglik_budget=0.0), "in \\(0, 1\\]"),
        (dict(marglik_curvature="online", marglik_budget=2.0), "in \\(0, 1\\]"),
        (dict(marglik_curvature="online", marglik_subset=0.5), "makes no pass"),
        (dict(marglik_curvature="batch"), "marglik_curvature='batch' is not valid"),
    ],
)
def test_bad_online_settings(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        MargLikTrainingArguments(output_dir=str(tmp_path), report_to="none", **kw)


def test_defaults_are_the_online_monte_carlo_curvature(tmp_path):
    """MargLikTrainingArguments' defaults: the online Monte-Carlo GGN at a budget of 0.25
    (every 3rd step); asking for a curvature subset makes the default a pass ('fit')."""
    args = MargLikTrainingArguments(output_dir=str(tmp_path), report_to="none")
    assert args.marglik_curvature == "online" and args.backend == "ggn-mc"
    trainer = MargLikTrainer(model=_MLP().double(), args=args, train_dataset=_data())
    trainer.train()
    assert trainer._online.every == 3 and trainer._online.settings.backend == "ggn-mc"
    subset = MargLikTrainingArguments(output_dir=str(tmp_path), marglik_subset=0.5)
    assert subset.marglik_curvature == "fit"
