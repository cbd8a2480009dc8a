"""``subset_of_weights`` (laplace-torch's option) and the predictive over a subset.

- A last-layer Laplace equals laplace-torch's last-layer Laplace where both are exact (float64
  MLP, exact GGN): marginal likelihood and GLM predictive.
- ``restricted_to("last_layer")`` of a fit over all tensors equals a last-layer fit, for every
  structure, to rounding (K-FAC and the diagonal are block-diagonal; ``full`` keeps ``H_SS``).
- ``predictive_subset_of_weights`` routes ``__call__``, ``predictive_samples`` and the
  gridsearch through that restriction, and is saved with the posterior.
"""

from __future__ import annotations

import laplace
import models as M
import pytest
import references as R
import torch
from laplace.curvature import AsdlGGN
from torch.utils.data import DataLoader, TensorDataset

from hf_marglik import Laplace

STRUCTURES = ["kron", "full", "diag"]


def _data(lik="classification"):
    model, loader, batches = M.mlp_peer_loader(lik)
    X = batches[0][0]
    xt = torch.randn(6, X.shape[1], generator=torch.Generator().manual_seed(7), dtype=X.dtype)
    return model, loader, xt


def _layerwise(n):
    return torch.linspace(0.6, 1.7, n, dtype=torch.float64)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("lik", ["classification", "regression"])
def test_last_layer_laplace_matches_laplace_torch(structure, lik):
    model, loader, xt = _data(lik)
    kw = {"sigma_noise": 0.8} if lik == "regression" else {}
    peer = laplace.Laplace(
        model, lik, subset_of_weights="last_layer", hessian_structure=structure,
        prior_precision=1.3, backend=AsdlGGN, **kw,
    )  # fmt: skip
    peer.fit(loader)
    ours = Laplace(
        model, lik, hessian_structure=structure, prior_precision=1.3,
        subset_of_weights="last_layer", **kw,
    )  # fmt: skip
    ours.fit(loader)
    assert ours.param_names == ["2.weight", "2.bias"]
    R.assert_close(
        ours.log_marginal_likelihood(), peer.log_marginal_likelihood(), rtol=1e-10, what="lml"
    )
    if lik == "classification":
        R.assert_close(ours(xt), peer(xt, pred_type="glm", link_approx="probit"), rtol=1e-9)
    else:
        m_ours, v_ours = ours(xt)
        m_peer, v_peer = peer(xt, pred_type="glm")
        R.assert_close(m_ours, m_peer, rtol=1e-10, what="mean")
        R.assert_close(v_ours, v_peer, rtol=1e-9, what="covariance")


@pytest.mark.parametrize("structure", STRUCTURES)
def test_restricted_to_equals_a_last_layer_fit(structure):
    model, loader, xt = _data()
    prior = _layerwise(4)
    full = Laplace(model, "classification", hessian_structure=structure, prior_precision=prior)
    full.fit(loader)
    view = full.restricted_to("last_layer")
    direct = Laplace(
        model, "classification", hessian_structure=structure, prior_precision=prior[2:],
        subset_of_weights="last_layer",
    )  # fmt: skip
    direct.fit(loader)
    assert view.param_names == direct.param_names == ["2.weight", "2.bias"]
    R.assert_close(view.prior_precision, prior[2:], what="restricted prior")
    R.assert_close(view.log_marginal_likelihood(), direct.log_marginal_likelihood(), what="lml")
    R.assert_close(view.posterior_covariance, direct.posterior_covariance, what="covariance")
    R.assert_close(view(xt), direct(xt), what="predictive")
    # H_SS is the sub-block of the full curvature (for every structure)
    keep = slice(sum(full.sizes[:2]), None)
    R.assert_close(view.curvature_dense(), full.curvature_dense()[keep, keep], what="H_SS")
    # the restriction is a view: the full posterior is untouched
    assert full.n_params == sum(full.sizes) and full.posterior.n_params == full.n_params


def test_diag_prior_is_restricted_entry_by_entry():
    model, loader, _ = _data()
    full = Laplace(model, "classification", hessian_structure="diag")
    n = full.n_params
    full.prior_precision = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    full.fit(loader)
    view = full.restricted_to("last_layer")
    R.assert_close(view.prior_precision, full.prior_precision[n - view.n_params :], what="prior")
    R.assert_close(view.mean, full.mean[n - view.n_params :], what="mean")


@pytest.mark.parametrize("structure", STRUCTURES)
def test_predictive_subset_routes_the_predictive(structure):
    model, loader, xt = _data()
    lap = Laplace(
        model, "classification", hessian_structure=structure, prior_precision=_layerwise(4),
        predictive_subset_of_weights="last_layer",
    )  # fmt: skip
    lap.fit(loader)
    view = lap.restricted_to("last_layer")
    R.assert_close(lap(xt), view(xt), what="glm probit")
    # the marginal likelihood stays over all tensors
    everything = Laplace(
        model, "classification", hessian_structure=structure, prior_precision=_layerwise(4)
    ).fit(loader)
    R.assert_close(lap.log_marginal_likelihood(), everything.log_marginal_likelihood())
    assert float((lap(xt) - everything(xt)).abs().max()) > 1e-6  # the subset does matter
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    R.assert_close(
        lap.predictive_samples(xt, pred_type="nn", n_samples=4, generator=g1),
        view.predictive_samples(xt, pred_type="nn", n_samples=4, generator=g2),
        what="nn samples",
    )
    # gridsearch tunes the predictive of the subset: the same choice as on the restriction
    val = DataLoader(TensorDataset(xt, torch.tensor([0, 1, 2, 0, 1, 2])), batch_size=3)
    lap.optimize_prior_precision(method="gridsearch", val_loader=val, grid_size=21)
    view.optimize_prior_precision(method="gridsearch", val_loader=val, grid_size=21)
    R.assert_close(lap.prior_precision, view.prior_precision, what="tuned prior")


def test_predictive_subset_is_saved(tmp_path):
    model, loader, xt = _data()
    lap = Laplace(model, "classification", predictive_subset_of_weights="last_layer")
    lap.fit(loader)
    lap.predictive_prior_precision = torch.full((4,), 3.0, dtype=torch.float64)
    lap.save_pretrained(tmp_path / "post")
    back = Laplace.from_pretrained(tmp_path / "post", model)
    assert back.predictive_subset_of_weights == "last_layer"
    R.assert_close(back(xt), lap(xt), what="reloaded predictive")
    only = Laplace(model, "classification", subset_of_weights="last_layer").fit(loader)
    only.save_pretrained(tmp_path / "ll")
    assert Laplace.from_pretrained(tmp_path / "ll", model).param_names == ["2.weight", "2.bias"]


def _answer_token_model(layers: int = 3):
    """A float64 answer-token classifier (the LM's logits at the last token, 4 class tokens) over
    a random LoRA LLaMA without a trained head, with a few labelled dict batches."""
    from hf_marglik.recipe.answer_token import AnswerTokenClassifier

    model = AnswerTokenClassifier(M.llama_lora_model(layers=layers), [3, 5, 7, 11]).double()
    batches = M._token_batches(vocab=16, n_batches=2, batch=3, seq=6, padded=True, seed=1)
    g = torch.Generator().manual_seed(2)
    for b in batches:
        b["labels"] = torch.randint(0, 4, (3,), generator=g)
    return model, batches


def test_last_layer_of_a_lora_model_is_its_last_adapted_layer():
    model = M.llama_lora_model(layers=2)
    lap = Laplace(model, "causal_lm", subset_of_weights="last_layer")
    assert [n.split("layers.", 1)[1] for n in lap.param_names] == [
        "1.self_attn.v_proj.lora_A.default.weight",
        "1.self_attn.v_proj.lora_B.default.weight",
    ]
    with pytest.raises(ValueError, match="predictive_subset_of_weights.*not valid"):
        Laplace(model, "causal_lm", predictive_subset_of_weights="head")


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_last_layer_predictive_of_a_lora_model_stops_at_the_last_block():
    """Laplace-LoRA's last-layer variant: the predictive over the last adapted layer's LoRA
    equals the restriction of the full fit (Jacobians: the full Jacobians' columns of those
    tensors) and backpropagates through the last block only."""
    model, batches = _answer_token_model()
    lap = Laplace(
        model, "classification", backend="ggn", prior_precision=_layerwise(12),
        predictive_subset_of_weights="last_layer",
    )  # fmt: skip
    lap.fit(batches)
    x = {k: v for k, v in batches[0].items() if k != "labels"}
    view = lap.restricted_to("last_layer")
    assert [n.split("layers.", 1)[1].split(".default")[0] for n in view.param_names] == [
        "2.self_attn.v_proj.lora_A", "2.self_attn.v_proj.lora_B",
    ]  # fmt: skip
    R.assert_close(lap(x), view(x), what="glm probit")
    _, every = lap.output_jacobians(x)
    _, last = view.output_jacobians(x)
    for got, want in zip(last, every[-2:]):
        R.assert_close(got, want, what="Jacobian columns of the last layer")
    # the backward stops at the last block: the first block sees no gradient
    first = model.lm.get_base_model().model.layers[0]
    seen = []
    hook = first.register_full_backward_hook(lambda *a: seen.append(1))
    try:
        lap(x)
        assert not seen, "the last-layer predictive backpropagated through the first block"
        lap.predictive_subset_of_weights = "all"
        lap(x)
        assert seen, "the hook must see the all-tensor predictive's backward"
    finally:
        hook.remove()


def test_last_layer_of_a_peft_classifier_is_its_head():
    model = M.bert_lora_model()
    lap = Laplace(model, "classification", subset_of_weights="last_layer")
    assert [n.rsplit("classifier.", 1)[-1] for n in lap.param_names] == [
        "modules_to_save.default.weight",
        "modules_to_save.default.bias",
    ]
