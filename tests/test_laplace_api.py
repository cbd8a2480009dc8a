"""``Laplace``'s contract beyond the numbers: the ASDL traps (NOTES.md), state round trips,
structure combinations, and bad input refused early with messages that name the bad value and
the valid ones."""

from __future__ import annotations

import io

import models as M
import pytest
import references as R
import torch

from hf_marglik import Laplace

OPTION_VALUES = {
    "likelihood": ["classification", "regression", "causal_lm"],
    "hessian_structure": ["kron", "diag", "full"],
    "backend": ["ggn", "ggn-mc", "ef"],
    "kfac_approx": ["expand", "reduce"],
    "prior_structure": ["scalar", "layerwise", "diag"],
}


def _fit_bert(model, batches, **kw):
    lap = Laplace(model, "classification", **kw)
    lap.fit(batches)
    return lap


def _snapshot(model):
    return (
        model.training,
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [p.detach().clone() for p in model.parameters()],
    )


def _assert_same_state(before, after):
    assert after[0] == before[0], "model.training changed"
    assert after[1] == before[1], "a submodule's train/eval mode changed"
    assert after[2] == before[2], "requires_grad flags changed"
    for g0, g1 in zip(before[3], after[3]):
        assert (g0 is None) == (g1 is None), ".grad appeared or vanished"
        if g0 is not None:
            assert torch.equal(g0, g1), ".grad changed"
    for p0, p1 in zip(before[4], after[4]):
        assert torch.equal(p0, p1), "a parameter changed"


class Boom(RuntimeError):
    pass


# ------------------------------------------------------------------------------ ASDL traps


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_second_fit_on_peft_modules_to_save_head(structure):
    """ASDL crashed on a second fit through peft's ModulesToSaveWrapper."""
    model, batches = M.bert_lora()
    lap = _fit_bert(model, batches, hessian_structure=structure)
    H1, lml1 = lap.curvature_dense(), lap.log_marginal_likelihood()
    lap.fit(batches)
    R.assert_close(lap.curvature_dense(), H1, what="second fit")
    R.assert_close(lap.log_marginal_likelihood(), lml1, what="second fit log marglik")
    head = [n for n in lap.param_names if "classifier" in n]
    assert len(head) == 2 and all("modules_to_save" in n for n in head), lap.param_names
    assert lap.n_layers == len(R.trainable(model))
    fresh = _fit_bert(model, batches, hessian_structure=structure)
    R.assert_close(fresh.curvature_dense(), H1, what="fresh Laplace")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_exception_mid_fit_restores_mode_flags_and_grads(mode):
    model, batches = M.bert_lora()
    model.train(mode == "train")
    # a frozen-but-present grad, a None grad, and a set grad on trainable tensors
    params = list(model.parameters())
    params[0].grad = torch.randn_like(params[0])
    for _, p in R.trainable(model)[:2]:
        p.grad = torch.randn_like(p)
    lap = Laplace(model, "classification", hessian_structure="kron")
    bad = {k: v.clone() for k, v in batches[1].items()}
    bad["input_ids"][0, 0] = 10_000  # out of the vocabulary: raises inside the embedding
    before = _snapshot(model)
    with pytest.raises((IndexError, RuntimeError)):
        lap.fit([batches[0], bad])
    _assert_same_state(before, _snapshot(model))

    def exploding():  # an exception from the loader, after one batch went through
        yield batches[0]
        raise Boom("loader failed")

    with pytest.raises(Boom):
        lap.fit(exploding())
    _assert_same_state(before, _snapshot(model))
    lap.fit(batches)  # and the next fit works
    _assert_same_state(before, _snapshot(model))


@pytest.mark.parametrize("backend", ["ggn", "ggn-mc", "ef"])
def test_grad_untouched_and_mode_kept_after_fit(backend):
    model, batches = M.bert_lora()
    model.train()
    trainable = R.trainable(model)
    trainable[0][1].grad = torch.randn_like(trainable[0][1])
    before = _snapshot(model)
    _fit_bert(model, batches, backend=backend)
    _assert_same_state(before, _snapshot(model))


def test_fit_is_deterministic_with_dropout_on():
    """The fit runs in eval mode: LoRA/attention dropout in a training-mode model must not
    enter the curvature (curvlinops' determinism check in spirit)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=3,
        hidden_dropout_prob=0.3,
        attention_probs_dropout_prob=0.3,
    )
    model = BertForSequenceClassification(cfg).double()
    lcfg = LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"], lora_dropout=0.3)
    model = M.randomise_trainable(get_peft_model(model, lcfg), 0)
    _, batches = M.bert_lora()
    model.train()
    H1 = _fit_bert(model, batches, hessian_structure="full").curvature_dense()
    H2 = _fit_bert(model, batches, hessian_structure="full").curvature_dense()
    R.assert_close(H2, H1, what="two fits with dropout configured")
    model.eval()
    ref = R.dense_ggn(model, batches, "classification")
    R.assert_close(H1, ref.H, what="fit vs eval-mode GGN")
    model.train()
    assert model.training


def test_ignored_labels_and_empty_data():
    model, batches = M.bert_lora(ignore_one=False)
    all_ignored = {k: v.clone() for k, v in batches[0].items()}
    all_ignored["labels"][:] = -100
    lap = _fit_bert(model, [batches[0], all_ignored], hessian_structure="full")
    ref = _fit_bert(model, [batches[0]], hessian_structure="full")
    assert lap.n_data == ref.n_data == 3
    R.assert_close(lap.curvature_dense(), ref.curvature_dense(), what="GGN")
    with pytest.raises(ValueError, match="-100"):
        _fit_bert(model, [all_ignored])


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_n_data_rescales_a_subset_fit(structure):
    model, batches = M.bert_lora(ignore_one=False)
    lap = _fit_bert(model, batches, hessian_structure=structure)
    sub = _fit_bert(model, batches[:1], hessian_structure=structure)
    sub2 = Laplace(model, "classification", hessian_structure=structure)
    sub2.fit(batches[:1], n_data=6)
    assert sub2.n_data == 6
    R.assert_close(sub2.loss, 2 * sub.loss, what="rescaled loss")
    R.assert_close(sub2.curvature_dense(), 2 * sub.curvature_dense(), what="rescaled GGN")
    assert lap.n_data == 6


# ---------------------------------------------------------------------------------- state


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_state_dict_round_trip(structure, tmp_path):
    model, batches = M.mlp_regression()
    prior = torch.linspace(0.5, 2.0, 4, dtype=torch.float64)
    lap = Laplace(
        model, "regression", hessian_structure=structure, prior_precision=prior, sigma_noise=0.7
    )
    lap.fit(batches)
    buf = io.BytesIO()
    torch.save(lap.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    other = Laplace(model, "regression", hessian_structure=structure)
    other.load_state_dict(sd)
    assert other.n_data == lap.n_data
    assert other.prior_structure == lap.prior_structure
    R.assert_close(other.prior_precision, lap.prior_precision, what="prior precision")
    R.assert_close(other.sigma_noise, lap.sigma_noise, what="sigma")
    R.assert_close(other.mean, lap.mean, what="mean")
    R.assert_close(other.curvature_dense(), lap.curvature_dense(), what="curvature")
    R.assert_close(other.log_marginal_likelihood(), lap.log_marginal_likelihood(), what="lml")
    lp = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    g1 = torch.autograd.grad(lap.log_marginal_likelihood(lp.exp()), lp)[0]
    g2 = torch.autograd.grad(other.log_marginal_likelihood(lp.exp()), lp)[0]
    R.assert_close(g2, g1, what="gradient after round trip")
    # a mismatching structure is refused
    wrong = {"kron": "diag", "diag": "full", "full": "kron"}[structure]
    with pytest.raises(ValueError, match="hessian_structure"):
        Laplace(model, "regression", hessian_structure=wrong).load_state_dict(sd)
    # and the file form
    if hasattr(lap, "save_pretrained"):
        lap.save_pretrained(tmp_path / "lap")
        loaded = type(lap).from_pretrained(tmp_path / "lap", model)
        R.assert_close(loaded.log_marginal_likelihood(), lap.log_marginal_likelihood(), what="file")


# -------------------------------------------------------------- prior × hessian structures


@pytest.mark.parametrize("hessian", ["kron", "diag", "full"])
@pytest.mark.parametrize("prior", ["scalar", "layerwise", "diag"])
def test_prior_structure_by_hessian_structure(hessian, prior):
    """Every combination gives the dense formula on its own curvature (or a clear error)."""
    model, batches = M.mlp_regression()
    sizes = R.sizes(model)
    n = {"scalar": 1, "layerwise": len(sizes), "diag": sum(sizes)}[prior]
    prec = torch.linspace(0.4, 1.9, n, dtype=torch.float64)
    try:
        lap = Laplace(
            model, "regression", hessian_structure=hessian, prior_precision=prec, sigma_noise=0.8
        )
        lap.fit(batches)
        value = lap.log_marginal_likelihood()
    except (ValueError, NotImplementedError) as e:  # allowed, if it says what to use instead
        msg = str(e)
        assert prior in msg and hessian in msg, f"unclear error: {msg}"
        return
    assert lap.prior_structure.value == prior
    ref = R.dense_ggn(model, batches, "regression")
    want = R.log_marglik(
        lap.curvature_dense(),
        ref.theta,
        R.per_parameter(prec, sizes),
        ref.loss,
        "regression",
        ref.n_data,
        ref.n_outputs,
        0.8,
    )
    R.assert_close(value, want, rtol=1e-9, what=f"{hessian} × {prior} log marglik")
    lp = prec.log().requires_grad_(True)
    (g,) = torch.autograd.grad(lap.log_marginal_likelihood(lp.exp()), lp)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("structure", ["scalar", "layerwise", "diag"])
def test_float_prior_laid_out_by_prior_structure(structure):
    model, batches = M.mlp_regression()
    lap = Laplace(model, "regression", prior_precision=0.5, prior_structure=structure)
    want = {"scalar": 1, "layerwise": 4, "diag": sum(R.sizes(model))}[structure]
    assert lap.prior_precision.numel() == want
    assert lap.prior_structure.value == structure
    assert torch.all(lap.prior_precision == 0.5)


# ------------------------------------------------------------------------------ bad input


class _Untouchable:
    """A loader that fails the test if it is iterated."""

    def __iter__(self):
        raise AssertionError("the data was touched before the input was validated")


@pytest.mark.parametrize("option", list(OPTION_VALUES))
def test_unknown_option_strings(option):
    model, _ = M.mlp_regression()
    bad = {
        "likelihood": "classifcation",
        "hessian_structure": "kronn",
        "backend": "ggm",
        "kfac_approx": "expnd",
        "prior_structure": "layer",
    }[option]
    kw = {"likelihood": "regression", option: bad}
    with pytest.raises(ValueError) as e:
        Laplace(model, **kw).fit(_Untouchable())
    msg = str(e.value)
    assert repr(bad) in msg or bad in msg, msg
    for valid in OPTION_VALUES[option]:
        assert valid in msg, f"{valid!r} missing from: {msg}"


def test_no_trainable_parameters():
    model, _ = M.mlp_regression()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Laplace(model, "regression").fit(_Untouchable())


@pytest.mark.parametrize("kind", ["LayerNorm", "Embedding"])
def test_trainable_non_linear_module_under_kron(kind):
    model, _ = M.bert_lora()
    name = next(
        n
        for n, m in model.named_modules()
        if type(m).__name__ == kind and ("word_embeddings" in n or kind == "LayerNorm")
    )
    for p in model.get_submodule(name).parameters():
        p.requires_grad_(True)
    with pytest.raises(ValueError) as e:
        Laplace(model, "classification", hessian_structure="kron").fit(_Untouchable())
    msg = str(e.value)
    assert name in msg and kind in msg and "Linear" in msg, msg


def test_batch_without_targets_raises_before_the_model_runs():
    model, batches = M.bert_lora()
    calls = []
    h = model.register_forward_pre_hook(lambda *a, **k: calls.append(1))
    try:
        no_y = {k: v for k, v in batches[0].items() if k != "labels"}
        with pytest.raises(KeyError) as e:
            Laplace(model, "classification").fit([no_y])
        assert "labels" in str(e.value) and "dict_key_y" in str(e.value)
        assert "input_ids" in str(e.value), "the message should list the batch's keys"
        with pytest.raises(KeyError, match="targets"):
            Laplace(model, "classification", dict_key_y="targets").fit(batches)
    finally:
        h.remove()
    assert not calls, "the model ran before the batch was validated"


@pytest.mark.parametrize(
    "kw,bad",
    [
        ({"prior_precision": 0.0}, "0."),
        ({"prior_precision": -1.0}, "-1."),
        ({"prior_precision": torch.tensor([1.0, -2.0, 1.0, 1.0])}, "-2."),
        ({"prior_precision": float("nan")}, "nan"),
        ({"sigma_noise": 0.0}, "0.0"),
        ({"sigma_noise": -0.5}, "-0.5"),
        ({"temperature": 0.0}, "0.0"),
        ({"n_mc_samples": 0}, "0"),
    ],
)
def test_non_positive_hyperparameters(kw, bad):
    model, _ = M.mlp_regression()
    with pytest.raises(ValueError) as e:
        Laplace(model, "regression", **kw).fit(_Untouchable())
    assert bad in str(e.value) and next(iter(kw)) in str(e.value), str(e.value)


def test_bad_prior_set_later_and_wrong_length():
    model, batches = M.mlp_regression()
    lap = Laplace(model, "regression")
    with pytest.raises(ValueError, match="prior_precision"):
        lap.prior_precision = -3.0
    with pytest.raises(ValueError, match="sigma_noise"):
        lap.sigma_noise = 0.0
    with pytest.raises(ValueError) as e:
        Laplace(model, "regression", prior_precision=torch.ones(3)).fit(_Untouchable())
    msg = str(e.value)
    assert "3" in msg and "4" in msg and str(sum(R.sizes(model))) in msg, msg


def test_sigma_noise_only_for_regression():
    model, _ = M.mlp_classification()
    with pytest.raises(ValueError, match="sigma_noise"):
        Laplace(model, "classification", sigma_noise=0.5).fit(_Untouchable())


def test_classification_with_sequence_logits_is_refused():
    model, batches = M.gpt2_lora()
    lap = Laplace(model, "classification")
    with pytest.raises(ValueError) as e:
        lap.fit(batches)
    msg = str(e.value)
    assert "causal_lm" in msg and "(2, 5, 16)" in msg, msg


def test_unfitted_use_is_refused():
    model, _ = M.mlp_regression()
    lap = Laplace(model, "regression")
    with pytest.raises(RuntimeError, match="fit"):
        lap.log_marginal_likelihood()
    lap_d = Laplace(model, "regression", hessian_structure="diag")
    lap_d.fit(M.mlp_regression()[1])
    with pytest.raises(ValueError, match="kron"):
        lap_d.kron_factors()


def test_tuple_batches_and_dataloader():
    from torch.utils.data import DataLoader, TensorDataset

    model, batches = M.mlp_regression()
    X = torch.cat([b[0] for b in batches])
    Y = torch.cat([b[1] for b in batches])
    lap1 = Laplace(model, "regression", hessian_structure="full")
    lap1.fit(batches)
    lap2 = Laplace(model, "regression", hessian_structure="full")
    lap2.fit(DataLoader(TensorDataset(X, Y), batch_size=3))
    assert lap1.n_data == lap2.n_data == 10
    R.assert_close(lap2.curvature_dense(), lap1.curvature_dense(), what="loader vs list")
