"""A posterior as two plain files (``Laplace.save_pretrained`` / ``from_pretrained``): the round
trip for every structure and setting a posterior carries, the refusals of a posterior that does
not fit the model, the deprecated ``.pt`` files, and the trainer's ``save_model``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from models import DictDataset, mlp, mlp_classification, mlp_regression, tiny_trainer_args
from safetensors.torch import load_file
from torch import nn

from hf_marglik import Laplace
from hf_marglik.pretrained import CONFIG_NAME, TENSORS_NAME
from hf_marglik.tensor_files import join_tensors, split_tensors


def _round_trip(lap: Laplace, folder, model=None) -> Laplace:
    lap.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == [CONFIG_NAME, TENSORS_NAME]  # no temporary file left
    return Laplace.from_pretrained(folder, lap.model if model is None else model)


def _same(a: Laplace, b: Laplace, x) -> None:
    """Equal to rounding: the marginal likelihood, the predictive, every stored tensor."""
    torch.testing.assert_close(b.log_marginal_likelihood(), a.log_marginal_likelihood())
    torch.testing.assert_close(b(x), a(x))
    sa, sb = split_tensors(a.state_dict()), split_tensors(b.state_dict())
    assert sa[0] == sb[0]  # the same layout and settings
    assert sa[1].keys() == sb[1].keys()
    for key in sa[1]:
        assert torch.equal(sa[1][key], sb[1][key]), key


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("prior", ["scalar", "layerwise", "diag"])
def test_round_trip_every_structure(tmp_path, structure, prior):
    model, batches = mlp_classification()
    n = {"scalar": 1, "layerwise": 4, "diag": 31}[prior]
    prec = torch.linspace(0.5, 3.0, n, dtype=torch.float64)
    lap = Laplace(model, "classification", hessian_structure=structure, prior_precision=prec)
    lap.fit(batches)
    back = _round_trip(lap, tmp_path / "post")
    _same(lap, back, batches[0][0])
    assert back.prior_structure == prior and back.hessian_structure == structure
    config = json.loads((tmp_path / "post" / CONFIG_NAME).read_text())
    assert config["format_version"] == 1 and config["prior_structure"] == prior
    assert config["parameters"][0] == {"name": "0.weight", "shape": [4, 3]}
    assert config["dtype"] == "float64" and config["n_data"] == lap.n_data == 9


def test_kron_shared_factors_are_stored_once_and_stay_shared(tmp_path):
    """A K-FAC factor several blocks share (a weight's and its bias's output factor) is one
    entry of the tensor file and one factor again after loading; compressed factors load as
    compressed."""
    model, batches = mlp_classification()
    lap = Laplace(model, "classification").fit(batches)
    assert lap.posterior.blocks == [(0, 1), (0, None), (2, 3), (2, None)]
    back = _round_trip(lap, tmp_path / "post")
    assert back.posterior.blocks == lap.posterior.blocks
    assert len(back.posterior.factors) == 4
    stored = load_file(tmp_path / "post" / TENSORS_NAME)
    assert sorted(k for k in stored if k.startswith("posterior.")) == [
        f"posterior.factors.{i}.{j}" for i in range(4) for j in range(2)
    ]
    lap.compress(rank=2)
    small = _round_trip(lap, tmp_path / "small")
    assert any(f.compressed for f in small.posterior.factors)
    _same(lap, small, batches[0][0])


def test_the_same_tensor_twice_is_stored_once():
    t, u = torch.arange(6.0), torch.zeros(2)
    skeleton, tensors = split_tensors({"a": [t, u], "b": (t, None), "c": "text"})
    assert list(tensors) == ["a.0", "a.1"]
    back = join_tensors(json.loads(json.dumps(skeleton)), tensors)
    assert back["a"][0] is back["b"][0] and back["b"][1] is None and back["c"] == "text"
    assert tensors["a.0"].data_ptr() != t.data_ptr()  # a copy: never shares the caller's memory


def test_round_trip_subsets_point_mass_prior_mean(tmp_path):
    """The settings beyond the curvature: a last-layer posterior, a predictive over the last
    layer with a tuned prior, the MAP's (point-mass) predictive prior, a per-parameter prior
    mean."""
    model, batches = mlp_classification()
    x = batches[0][0]
    only = Laplace(model, "classification", subset_of_weights="last_layer").fit(batches)
    back = _round_trip(only, tmp_path / "ll")
    assert back.param_names == ["2.weight", "2.bias"]
    _same(only, back, x)

    mu = torch.linspace(-0.1, 0.1, 31, dtype=torch.float64)
    lap = Laplace(
        model, "classification", predictive_subset_of_weights="last_layer", prior_mean=mu
    ).fit(batches)
    lap.predictive_prior_precision = torch.full((4,), 3.0, dtype=torch.float64)
    back = _round_trip(lap, tmp_path / "tuned")
    _same(lap, back, x)
    assert back.predictive_subset_of_weights == "last_layer"
    assert torch.equal(back.prior_mean, mu) and torch.equal(
        back.predictive_prior_precision, lap.predictive_prior_precision
    )
    config = json.loads((tmp_path / "tuned" / CONFIG_NAME).read_text())
    assert config["prior_mean"] == "per_parameter"
    assert config["predictive_prior"] == {"structure": "layerwise", "point_mass": False}

    lap.predictive_prior_precision = float("inf")  # the MAP's predictive
    back = _round_trip(lap, tmp_path / "map")
    assert torch.isposinf(back.predictive_prior_precision).all()
    _same(lap, back, x)
    config = json.loads((tmp_path / "map" / CONFIG_NAME).read_text())
    assert config["predictive_prior"] == {"structure": "scalar", "point_mass": True}


def test_round_trip_regression_noise_temperature_and_options(tmp_path):
    model, batches = mlp_regression()
    lap = Laplace(
        model,
        "regression",
        hessian_structure="full",
        sigma_noise=0.7,
        temperature=2.0,
        prior_mean=0.25,
        dict_key_x="x",
        n_mc_samples=3,
        batch_columns=True,
    ).fit(batches)
    back = _round_trip(lap, tmp_path / "post")
    _same(lap, back, batches[0][0])
    assert float(back.sigma_noise) == 0.7 and back.temperature == 2.0 and back.prior_mean == 0.25
    assert (back.dict_key_x, back.n_mc_samples, back.batch_columns) == ("x", 3, True)
    config = json.loads((tmp_path / "post" / CONFIG_NAME).read_text())
    assert (config["sigma_noise"], config["prior_mean"]) == (0.7, "scalar")


# ---------------------------------------------------------------- refusals
def test_a_posterior_that_does_not_fit_the_model_is_refused(tmp_path):
    model, batches = mlp_classification()
    Laplace(model, "classification").fit(batches).save_pretrained(tmp_path / "post")
    wider = mlp(3, 5, 3)  # the same names, a hidden layer of 5
    with pytest.raises(ValueError, match=r"'0\.weight' has shape \[4, 3\] in the posterior and \[5, 3\] in the model"):  # fmt: skip
        Laplace.from_pretrained(tmp_path / "post", wider)
    frozen = mlp(3, 4, 3)
    frozen[0].bias.requires_grad_(False)  # one trainable tensor fewer
    with pytest.raises(ValueError, match=r"tensor 1 is '0\.bias' in the posterior and '2\.weight' in the model"):  # fmt: skip
        Laplace.from_pretrained(tmp_path / "post", frozen)
    longer = nn.Sequential(*mlp(3, 4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    with pytest.raises(ValueError, match=r"the model has '4\.weight' \(tensor 4\), the posterior has no more"):  # fmt: skip
        Laplace.from_pretrained(tmp_path / "post", longer)


def test_bad_folders_are_refused_with_the_way_out(tmp_path, monkeypatch):
    import huggingface_hub

    model, batches = mlp_classification()
    lap = Laplace(model, "classification").fit(batches)
    with pytest.raises(FileNotFoundError, match="owner/name"):
        Laplace.from_pretrained(tmp_path / "nowhere", model)
    # an id that is no local folder goes to the Hub (offline here: its own error, no download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        huggingface_hub.errors.LocalEntryNotFoundError, match="offline|HF_HUB_OFFLINE"
    ):
        Laplace.from_pretrained("someone/no-such-posterior", model)
    (tmp_path / "old").mkdir()
    with pytest.warns(FutureWarning):
        lap.save(tmp_path / "old" / "laplace_posterior.pt")
    with pytest.raises(FileNotFoundError, match="convert_posterior.py"):
        Laplace.from_pretrained(tmp_path / "old", model)
    with pytest.raises(ValueError, match="is a file"):
        Laplace.from_pretrained(tmp_path / "old" / "laplace_posterior.pt", model)
    lap.save_pretrained(tmp_path / "new")
    config = json.loads((tmp_path / "new" / CONFIG_NAME).read_text())
    (tmp_path / "new" / CONFIG_NAME).write_text(json.dumps({**config, "format_version": 2}))
    with pytest.raises(ValueError, match="format_version=2; .* upgrade hf_marglik"):
        Laplace.from_pretrained(tmp_path / "new", model)


# ---------------------------------------------------------------- the deprecated .pt files
def test_legacy_pt_loads_with_a_notice_and_converts(tmp_path):
    model, batches = mlp_classification()
    lap = Laplace(model, "classification", hessian_structure="kron").fit(batches)
    with pytest.warns(FutureWarning, match="save_pretrained"):
        lap.save(tmp_path / "old.pt")
    with pytest.warns(FutureWarning, match=r"deprecated: use lap\.save_pretrained") as record:
        old = Laplace.load(tmp_path / "old.pt", model)
    assert len(record) == 1 and "\n" not in str(record[0].message)  # one line
    _same(lap, old, batches[0][0])
    new = _round_trip(old, tmp_path / "converted")  # the documented conversion
    _same(lap, new, batches[0][0])


# ---------------------------------------------------------------- the trainer
class _Wide(nn.Module):
    """An MLP with 200k parameters taking ``input_ids`` (a dict-batch model for the Trainer)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 40_000), nn.Tanh(), nn.Linear(40_000, 2))

    def forward(self, input_ids):
        return self.body(input_ids)


def test_trainer_save_model_writes_the_posterior_as_safetensors(tmp_path):
    """save_model after train(): the hyperparameters' JSON and the final posterior, which loads
    over the model and equals ``trainer.laplace``; a diagonal prior too long for the JSON goes to
    a safetensors file. Nothing it adds to the Trainer's files is a pickle."""
    from hf_marglik import MargLikTrainer

    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 3, generator=g, dtype=torch.float64)
    data = DictDataset([{"input_ids": X[i], "labels": int(X[i, 0] > 0)} for i in range(16)])
    model = _Wide().double()
    args = tiny_trainer_args(
        tmp_path / "out",
        num_train_epochs=1,
        hessian_structure="diag",
        prior_structure="diag",
        eval_laplace=False,
    )
    trainer = MargLikTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    names = set(os.listdir(out))
    assert {CONFIG_NAME, TENSORS_NAME, "marglik_hyperparameters.json"} <= names
    assert "marglik_prior_precision.safetensors" in names  # 200k precisions
    ours = names - {"model.safetensors", "training_args.bin"}  # the Trainer's own files
    assert not any(n.endswith((".pt", ".bin", ".pth")) for n in ours), names
    saved = load_file(out / "marglik_prior_precision.safetensors")["prior_precision"]
    assert torch.equal(saved, trainer.laplace.prior_precision)
    back = Laplace.from_pretrained(out, trainer.model)
    _same(trainer.laplace, back, X[:4])
