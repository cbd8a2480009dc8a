"""``marglik_training`` and ``MargLikTrainer`` run one Algorithm 1 (``hf_marglik.loop``): on the
same model, data and optimiser they give the same histories, hyperparameters, parameters and
posterior to rounding, with the prior in the loss (laplace-torch's) and decoupled (the
trainers' default). Full-batch epochs make the data order irrelevant (the Trainer shuffles,
the function takes the loader's order); Adam without weight decay, a constant step size and no
gradient clipping make the two optimisers the same."""

from __future__ import annotations

import pytest
import torch
from models import DictDataset, tiny_trainer_args
from torch import nn
from torch.utils.data import DataLoader

from hf_marglik import MargLikTrainer, marglik_training

pytestmark = pytest.mark.usefixtures("one_thread")
N, EPOCHS, LR, HYPERSTEPS = 24, 4, 1e-2, 5


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, input_ids):
        return self.net(input_ids)


def _examples():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 3, generator=g, dtype=torch.float64)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    return [{"input_ids": X[i], "labels": y[i]} for i in range(N)]


def _trainer_run(tmp_path, application):
    trainer = MargLikTrainer(
        model=_MLP().double(),
        args=tiny_trainer_args(
            tmp_path / "out",
            num_train_epochs=EPOCHS,
            per_device_train_batch_size=N,
            learning_rate=LR,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            optim="adamw_torch",
            adam_epsilon=1e-8,
            weight_decay=0.0,
            n_hypersteps=HYPERSTEPS,
            prior_application=application,
            restore_best_marglik=True,  # marglik_training's (laplace-torch's) choice
        ),
        train_dataset=DictDataset(_examples()),
    )
    trainer.train()
    return trainer.laplace, trainer.model, trainer.margliks, trainer.losses


def _function_run(application):
    loader = DataLoader(_examples(), batch_size=N)  # default collate: a dict of stacked tensors
    return marglik_training(
        _MLP().double(),
        loader,
        n_epochs=EPOCHS,
        n_hypersteps=HYPERSTEPS,
        optimizer_kwargs={"lr": LR},
        prior_application=application,
    )


@pytest.mark.parametrize("application", ["loss", "decoupled"])
def test_function_and_trainer_are_one_loop(tmp_path, application):
    lap_t, model_t, ml_t, loss_t = _trainer_run(tmp_path, application)
    lap_f, model_f, ml_f, loss_f = _function_run(application)
    assert len(ml_t) == len(ml_f) == EPOCHS * HYPERSTEPS
    close = dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.tensor(loss_t), torch.tensor(loss_f), **close)
    torch.testing.assert_close(torch.tensor(ml_t), torch.tensor(ml_f), **close)
    for (name, p), q in zip(model_t.named_parameters(), model_f.parameters()):
        torch.testing.assert_close(p, q, **close, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(lap_t.prior_precision, lap_f.prior_precision, **close)
    torch.testing.assert_close(
        lap_t.log_marginal_likelihood(), lap_f.log_marginal_likelihood(), **close
    )
    torch.testing.assert_close(lap_t.curvature_dense(), lap_f.curvature_dense(), **close)
