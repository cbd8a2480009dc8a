"""A prior centred away from zero: ``Laplace(prior_mean=...)`` (laplace-torch's option) and the
trainers' ``prior_mean="init"`` (the prior centred at the parameters when training starts).

- The scatter term and the log marginal likelihood with a per-parameter prior mean equal
  laplace-torch's (float64 MLP, exact GGN), and the mean is saved with the posterior and
  restricted with the tensors.
- With ``prior_mean="init"`` the trainer's log joint is ``Σ ℓ + n·½(θ−θ₀)ᵀP(θ−θ₀)/N``: its
  prior term vanishes at the start; the final posterior's scatter is ``(θ*−θ₀)ᵀP(θ*−θ₀)``; the
  centre survives a resume, and a checkpoint of the other setting is refused.
"""

from __future__ import annotations

import laplace
import models as M
import pytest
import references as R
import torch
from laplace.curvature import AsdlGGN
from test_trainer import MLP, _args, _mlp_data, _mlp_trainer

from hf_marglik import Laplace, MargLikTrainer


def _mlp_pair(structure):
    model, loader, _ = M.mlp_peer_loader()
    n = sum(p.numel() for p in model.parameters())
    mu = torch.linspace(-0.3, 0.4, n, dtype=torch.float64)
    prior = torch.linspace(0.6, 1.7, 4, dtype=torch.float64)
    peer = getattr(laplace, {"kron": "KronLaplace", "full": "FullLaplace"}[structure])(
        model, "classification", prior_precision=prior.clone(), prior_mean=mu.clone(),
        backend=AsdlGGN,
    )  # fmt: skip
    peer.fit(loader)
    ours = Laplace(
        model, "classification", hessian_structure=structure, prior_precision=prior.clone(),
        prior_mean=mu.clone(),
    )  # fmt: skip
    ours.fit(loader)
    return ours, peer, model, mu


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_prior_mean_matches_laplace_torch(structure):
    ours, peer, _, mu = _mlp_pair(structure)
    R.assert_close(ours.scatter, peer.scatter, rtol=1e-10, what="scatter")
    R.assert_close(
        ours.log_marginal_likelihood(), peer.log_marginal_likelihood(), rtol=1e-10, what="lml"
    )
    zero_mean = (ours.prior.per_parameter() * ours.mean * ours.mean).sum()
    assert abs(float(ours.scatter - zero_mean)) > 1e-3  # the mean does enter


def test_prior_mean_is_saved_and_restricted(tmp_path):
    ours, _, model, mu = _mlp_pair("kron")
    ours.save_pretrained(tmp_path / "p")
    back = Laplace.from_pretrained(tmp_path / "p", model)
    R.assert_close(back.prior_mean, mu, what="reloaded mean")
    R.assert_close(back.log_marginal_likelihood(), ours.log_marginal_likelihood(), what="lml")
    head = ours.restricted_to("last_layer")
    R.assert_close(head.prior_mean, mu[-head.n_params :], what="restricted mean")
    with pytest.raises(ValueError, match="prior_mean has 3 entries"):
        Laplace(model, "classification", prior_mean=torch.zeros(3, dtype=torch.float64))


def test_trainer_prior_centred_at_init(tmp_path):
    data = _mlp_data()
    trainer = _mlp_trainer(tmp_path, dataset=data, prior_prec_init=3.0, prior_mean="init")
    theta0 = [p.detach().clone() for p in trainer.model.parameters()]
    trainer._start(None)
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in ("input_ids", "labels")}
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=8)
    ce = torch.nn.functional.cross_entropy(trainer.model(batch["input_ids"]), batch["labels"])
    assert loss.item() == pytest.approx(ce.item(), rel=1e-12)  # θ = θ₀: no prior term
    trainer.train()
    lap = trainer.laplace
    d = torch.cat(
        [(p.detach() - t).reshape(-1) for p, t in zip(trainer.model.parameters(), theta0)]
    )
    expected = (lap.prior.per_parameter() * d * d).sum()
    R.assert_close(lap.scatter, expected, what="scatter about θ₀")
    zero = _mlp_trainer(tmp_path / "zero", dataset=data, prior_prec_init=3.0)
    zero.train()
    assert not torch.allclose(
        zero.marglik_loop.hyper.prior_precision, trainer.marglik_loop.hyper.prior_precision
    )


def test_resume_keeps_the_centre_and_refuses_the_other_setting(tmp_path):
    kw = dict(num_train_epochs=2, save_strategy="steps", save_steps=1, prior_mean="init")
    full = _mlp_trainer(tmp_path, **kw)
    full.train()
    ckpt = str(tmp_path / "out" / "checkpoint-3")
    resumed = MargLikTrainer(
        model=MLP(seed=7).double(), args=_args(tmp_path, **kw), train_dataset=_mlp_data()
    )
    resumed.train(resume_from_checkpoint=ckpt)
    assert resumed.margliks == full.margliks
    assert torch.equal(resumed.marglik_loop.hyper.prior_mean, full.marglik_loop.hyper.prior_mean)
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)
    other = MargLikTrainer(
        model=MLP(seed=7).double(),
        args=_args(tmp_path, **{**kw, "prior_mean": "zero"}),
        train_dataset=_mlp_data(),
    )
    with pytest.raises(ValueError, match="prior_mean='init'.*resume with the checkpoint"):
        other.train(resume_from_checkpoint=ckpt)
