"""``Laplace(..., batch_columns=True)``: the exact GGN's loss-Hessian columns and the GLM
predictive's Jacobian rows backpropagated together in ``vmap``-ed backward passes give the
numbers of the one-at-a-time loop (float64, to rounding), and of the dense references."""

from __future__ import annotations

import models as M
import pytest
import references as R
import torch

from hf_marglik import Laplace
from hf_marglik import curvature as C

CASES = {
    "mlp-cls": (M.mlp_classification, "classification", "x"),
    "mlp-reg": (M.mlp_regression, "regression", "x"),
    "bert-cls": (M.bert_lora, "classification", "input_ids"),
    "llama-lm": (M.llama_lora, "causal_lm", "input_ids"),
    # more than 16 columns: several vmap-ed passes per batch (and one column per class)
    "mlp-cls-70": (lambda: M.mlp_classification(n_classes=70), "classification", "x"),
}


def _fit(name, structure, batch_columns, **kw):
    builder, lik, key = CASES[name]
    model, batches = builder()
    kw.setdefault("backend", "ggn")
    lap = Laplace(
        model,
        lik,
        hessian_structure=structure,
        prior_precision=0.7,
        sigma_noise=0.8 if lik == "regression" else 1.0,
        dict_key_x=key,
        batch_columns=batch_columns,
        **kw,
    )
    lap.fit(batches)
    return lap, model, batches


@pytest.fixture
def spy(monkeypatch):
    """The number of columns of each batched backward pass."""
    calls: list[int] = []
    real = C.Recorder.batched_output_grads

    def counting(self, root, columns, retain_graph):
        calls.append(int(columns.shape[0]))
        return real(self, root, columns, retain_graph)

    monkeypatch.setattr(C.Recorder, "batched_output_grads", counting)
    return calls


def _precision(lap) -> torch.Tensor:
    P = lap.posterior_precision
    return P.to_matrix() if hasattr(P, "to_matrix") else torch.as_tensor(P)


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("name", list(CASES))
def test_batched_fit_equals_loop(name, structure, spy):
    loop, _, _ = _fit(name, structure, False)
    assert spy == []
    batched, _, _ = _fit(name, structure, True)
    assert spy and max(spy) <= C.MAX_BATCHED_COLUMNS
    if name == "mlp-cls-70":
        assert len(spy) > 2  # 70 columns per batch: several chunks
    R.assert_close(_precision(batched), _precision(loop), rtol=1e-10, what="posterior precision")
    R.assert_close(
        batched.log_marginal_likelihood(), loop.log_marginal_likelihood(), rtol=1e-12, what="lml"
    )


@pytest.mark.parametrize("name", ["mlp-cls", "bert-cls", "llama-lm"])
def test_batched_full_fit_is_the_dense_ggn(name):
    lap, model, batches = _fit(name, "full", True)
    ref = R.dense_ggn(model, batches, CASES[name][1])
    R.assert_close(
        _precision(lap) - 0.7 * torch.eye(ref.H.shape[0], dtype=torch.float64), ref.H, rtol=1e-10
    )


def test_single_columns_and_small_chunks(monkeypatch, spy):
    """Chunks of one column (a plain backward pass, no vmap) and of two."""
    loop, _, _ = _fit("bert-cls", "kron", False)
    for size in (1, 2):
        spy.clear()
        monkeypatch.setattr(C, "MAX_BATCHED_COLUMNS", size)
        lap, _, _ = _fit("bert-cls", "kron", True)
        assert set(spy) == {size}
        R.assert_close(_precision(lap), _precision(loop), rtol=1e-10)


def test_monte_carlo_samples_batched(spy):
    """Several Monte-Carlo samples per data point go in one batched pass, drawing the same labels."""
    loop, _, _ = _fit("bert-cls", "kron", False, backend="ggn-mc", n_mc_samples=3, seed=5)
    batched, _, _ = _fit("bert-cls", "kron", True, backend="ggn-mc", n_mc_samples=3, seed=5)
    assert spy and set(spy) == {3}
    R.assert_close(_precision(batched), _precision(loop), rtol=1e-10)


@pytest.mark.parametrize("name", ["mlp-cls", "bert-cls"])
def test_batched_glm_jacobians(name, spy):
    loop, model, batches = _fit(name, "kron", False)
    batched = Laplace(model, "classification", dict_key_x=CASES[name][2], batch_columns=True)
    f0, J0 = loop.output_jacobians(batches[0])
    f1, J1 = batched.output_jacobians(batches[0])
    assert spy
    R.assert_close(f1, f0, rtol=1e-12)
    for a, b in zip(J1, J0):
        R.assert_close(a, b, rtol=1e-10)
    J, _, _ = R.jacobian(model, batches[0], "classification")  # (n, k, P), the brute force
    R.assert_close(torch.cat(J1, dim=1), J.reshape(-1, J.shape[-1]), rtol=1e-10)


def test_gradient_checkpointing_keeps_the_loop(spy):
    """A model that trains with gradient checkpointing is fitted one column at a time."""
    model, batches = M.bert_lora(num_labels=3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lap = Laplace(model, "classification", backend="ggn", batch_columns=True)
    lap.fit(batches)
    lap.output_jacobians(batches[0])
    assert spy == []


def test_saved_with_the_posterior(tmp_path):
    lap, model, _ = _fit("mlp-cls", "kron", True)
    lap.save_pretrained(tmp_path / "lap")
    assert Laplace.from_pretrained(tmp_path / "lap", model).batch_columns is True
