"""``MargLikTrainer`` and ``MargLikTrainingArguments`` on tiny models built from configs (no
downloads): peft LoRA on BERT (sequence classification), GPT-2 and LLaMA (causal LM), and plain
modules in float64 where results must agree exactly."""

from __future__ import annotations

import json
import math
import os

import peft  # noqa: E402, F401
import pytest
import torch
from models import DictDataset, tiny_trainer_args
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from hf_marglik.trainer import HYPERPARAMETERS_NAME, STATE_NAME, MargLikTrainer
from hf_marglik.training_args import MargLikTrainingArguments

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(tmp_path, **kw) -> MargLikTrainingArguments:
    return tiny_trainer_args(tmp_path / "out", **kw)


class _ModeRecorder(TrainerCallback):
    """Records (global step, model.training) whenever the hyperparameters are logged."""

    def __init__(self):
        self.records: list[tuple[int, bool]] = []

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs and "marglik" in logs:
            self.records.append((state.global_step, model.training))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _check_only_trainable_moved(model, before):
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"{n} did not move"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} moved"


# ---------------------------------------------------------------------- tiny models
V, T = 30, 8


def _tokens(n=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[::3, -2:] = 0
    return ids, mask


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=T,
        num_labels=3,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    lora = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS, r=2, target_modules=["query", "value"], lora_dropout=0.1
    )
    return peft.get_peft_model(model, lora)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=T, bos_token_id=0, eos_token_id=0
    )
    lora = peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM, r=2, target_modules=["c_attn"], fan_in_fan_out=True
    )
    return peft.get_peft_model(GPT2LMHeadModel(config), lora)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=T,
        bos_token_id=0,
        eos_token_id=0,
    )
    lora = peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM, r=2, target_modules=["q_proj", "v_proj"]
    )
    return peft.get_peft_model(LlamaForCausalLM(config), lora)


class MLP(nn.Module):
    def __init__(self, n_in=3, n_out=2, seed=1):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(n_in, 8), nn.Tanh(), nn.Linear(8, n_out))

    def forward(self, input_ids):
        return self.net(input_ids)


def _mlp_data(n=16, regression=False, ignore=()):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    if regression:
        y = (X @ torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)).unsqueeze(-1)
    else:
        y = (X[:, 0] > 0).long()
        y[list(ignore)] = -100
    return DictDataset([{"input_ids": X[i], "labels": y[i]} for i in range(n)])


def _mlp_trainer(tmp_path, n_out=2, dataset=None, callbacks=None, **kw):
    model = MLP(n_out=n_out).double()
    return MargLikTrainer(
        model=model,
        args=_args(tmp_path, **kw),
        train_dataset=dataset if dataset is not None else _mlp_data(),
        callbacks=callbacks,
    )


# ---------------------------------------------------------------------- LoRA models
def test_lora_bert_sequence_classification(tmp_path):
    """Only adapter and head move; hyper-updates at epochs 2 and 4 (burn-in 1, every 2nd
    epoch); logs hold the marglik keys; train mode after each update; best restore."""
    ids, mask = _tokens()
    data = DictDataset(
        [
            {"input_ids": ids[i], "attention_mask": mask[i], "labels": torch.tensor(i % 3)}
            for i in range(16)
        ]
    )
    model = _bert()
    before = _snapshot(model)
    modes = _ModeRecorder()
    trainer = MargLikTrainer(
        model=model,
        args=_args(tmp_path, num_train_epochs=4, n_epochs_burnin=1, marglik_frequency=2),
        train_dataset=data,
        eval_dataset=data,
        callbacks=[modes],
    )
    trainer.train()

    assert trainer.marglik_update_steps == [4, 8]
    assert modes.records == [(4, True), (8, True)]
    assert len(trainer.margliks) == 2 * 3 and len(trainer.losses) == 4
    logs = [entry for entry in trainer.state.log_history if "marglik" in entry]
    assert [entry["step"] for entry in logs] == [4, 8]
    head = "prior_prec/classifier.modules_to_save.default.weight"
    for key in ("prior_prec_mean", "prior_prec_min", "prior_prec_max", head):
        assert key in logs[-1]
    assert "sigma_noise" not in logs[-1]
    assert logs[-1]["marglik"] == pytest.approx(-trainer.margliks[-1])

    _check_only_trainable_moved(model, before)
    best = trainer.marglik_loop.best
    last_of_each = [trainer.margliks[2], trainer.margliks[5]]
    assert best.step == [4, 8][last_of_each.index(min(last_of_each))]
    for p, b in zip(trainer.marglik_loop.params, best.params):
        assert torch.equal(p, b)
    assert torch.equal(trainer.laplace.prior_precision, best.prior_precision)
    assert trainer.laplace.n_data == 16 and model.training
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    for name in ("accuracy", "nll", "ece", "brier"):
        assert math.isfinite(metrics[f"eval_map_{name}"])
        assert math.isfinite(metrics[f"eval_laplace_{name}"])
    # the reported Laplace metrics are the posterior predictive's, the MAP ones the softmax's
    from hf_marglik import calibration_metrics

    batch = {k: torch.stack([d[k] for d in data.items]) for k in data.items[0]}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    lap_probs = trainer.laplace(inputs, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        map_probs = torch.softmax(model(**inputs).logits.double(), -1)
    expected_lap = calibration_metrics(lap_probs, batch["labels"])
    expected_map = calibration_metrics(map_probs, batch["labels"])
    for name in ("accuracy", "nll", "ece", "brier"):
        # float32 model: batched and whole-batch predictions differ by rounding (~1e-8)
        assert metrics[f"eval_laplace_{name}"] == pytest.approx(expected_lap[name], rel=1e-6)
        assert metrics[f"eval_map_{name}"] == pytest.approx(expected_map[name], rel=1e-6)
    assert abs(metrics["eval_laplace_nll"] - metrics["eval_map_nll"]) > 1e-4


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_lora_causal_lm(tmp_path, build):
    """Token-level likelihood: N counts target tokens; updates every 3 optimizer steps."""
    ids, mask = _tokens()
    labels = torch.where(mask.bool(), ids, -100)
    data = DictDataset(
        [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(16)]
    )
    model = build()
    before = _snapshot(model)
    modes = _ModeRecorder()
    trainer = MargLikTrainer(
        model=model,
        args=_args(
            tmp_path,
            likelihood="causal_lm",
            backend="ggn-mc",
            per_device_train_batch_size=4,
            num_train_epochs=2,
            marglik_steps=3,
            n_hypersteps=2,
        ),
        train_dataset=data,
        callbacks=[modes],
    )
    trainer.train()
    n_tokens = 16 * (T - 1) - 6 * 2
    assert trainer.n_data == n_tokens and trainer.laplace.n_data == n_tokens
    assert trainer.marglik_update_steps == [3, 6]
    assert modes.records == [(3, True), (6, True)]
    assert len(trainer.losses) == 2
    _check_only_trainable_moved(model, before)


def test_datasets_tokenizer_and_collator(tmp_path):
    """The usual HF pipeline: a datasets.Dataset of variable-length texts, a tokenizer and
    DataCollatorForLanguageModeling (padding labelled -100), curvature on a subset."""
    import datasets
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(V - 2)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    g = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(2, T + 1, (12,), generator=g)]
    texts = [
        " ".join(f"w{int(i)}" for i in torch.randint(0, V - 2, (n,), generator=g)) for n in lengths
    ]
    data = datasets.Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"]), batched=True, remove_columns=["text"]
    )
    trainer = MargLikTrainer(
        model=_llama(),
        args=_args(
            tmp_path,
            likelihood="causal_lm",
            backend="ggn-mc",
            per_device_train_batch_size=4,
            num_train_epochs=1,
            marglik_subset=6,
        ),
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )
    trainer.train()
    assert trainer.n_data == sum(n - 1 for n in lengths)
    assert len(trainer._fit_dataset) == 6
    assert trainer.laplace.n_data == trainer.n_data
    assert trainer.marglik_update_steps == [3]


def test_argument_parser(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(MargLikTrainingArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--likelihood",
            "causal_lm",
            "--marglik_subset",
            "0.5",
            "--marglik_steps",
            "50",
            "--report_to",
            "none",
        ]
    )
    assert args.likelihood == "causal_lm" and args.marglik_subset == 0.5
    assert args.marglik_steps == 50
    # the defaults: the decoupled prior, and then the last model is kept
    assert args.prior_application == "decoupled" and args.restore_best_marglik is False
    assert json.loads(args.to_json_string())["likelihood"] == "causal_lm"


# ---------------------------------------------------------------------- plain modules, exact
def test_loss_is_log_joint_per_data_point(tmp_path):
    """compute_loss = (Σ CE + n·½θᵀPθ/N) / n, with -100 labels excluded from n and N."""
    data = _mlp_data(ignore=(0, 5))
    trainer = _mlp_trainer(tmp_path, dataset=data, prior_prec_init=3.0)
    trainer._start(None)
    assert trainer.n_data == 14
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in ("input_ids", "labels")}
    n = int((batch["labels"] != -100).sum())
    assert n == 6
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=10)
    logits = trainer.model(batch["input_ids"])
    ce = nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
    theta2 = sum((p**2).sum() for p in trainer.model.parameters())
    expected = (ce + n * 0.5 * 3.0 * theta2 / 14) / 10
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    trainer.model.eval()
    eval_loss = trainer.compute_loss(trainer.model, batch)
    assert eval_loss.item() == pytest.approx((ce / n).item(), rel=1e-12)


def test_update_leaves_gradients_optimizer_and_mode(tmp_path):
    """A hyper-update changes the hyperparameters only: not .grad, not the optimizer state, not
    the train/eval mode."""
    trainer = _mlp_trainer(tmp_path, num_train_epochs=1)
    trainer.train()
    opt_state = {
        k: {n: v.clone() for n, v in s.items()} for k, s in trainer.optimizer.state.items()
    }
    grads = [torch.randn_like(p) for p in trainer.model.parameters()]
    for p, g in zip(trainer.model.parameters(), grads):
        p.grad = g.clone()
    before = trainer.marglik_loop.hyper.log_prior_prec.detach().clone()
    for mode in (True, False):
        trainer.model.train(mode)
        trainer._marglik_update()
        assert trainer.model.training is mode
    assert not torch.equal(trainer.marglik_loop.hyper.log_prior_prec, before)
    for p, g in zip(trainer.model.parameters(), grads):
        assert torch.equal(p.grad, g)
    for k, s in trainer.optimizer.state.items():
        for n, v in s.items():
            assert torch.equal(v, opt_state[k][n])


def test_gradient_accumulation_2x4_equals_1x8(tmp_path):
    data = _mlp_data(ignore=(1, 2, 3, 9))
    runs = []
    for bs, ga in [(4, 2), (8, 1)]:
        trainer = _mlp_trainer(
            tmp_path / f"{bs}",
            dataset=data,
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            num_train_epochs=3,
        )
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        runs.append((trainer, losses))
    (a, la), (b, lb) = runs
    assert a.marglik_update_steps == b.marglik_update_steps == [2, 4, 6]
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=0)
    torch.testing.assert_close(a.margliks, b.margliks, rtol=1e-10, atol=0)
    torch.testing.assert_close(a.losses, b.losses, rtol=1e-10, atol=0)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


class _StepCounter(TrainerCallback):
    def __init__(self):
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_resume_equals_uninterrupted(tmp_path):
    """Checkpoints mid-epoch (step 3) and at an epoch end where a hyper-update happened (step
    4): resuming from either, with a differently initialised model, continues from the
    checkpoint and gives the uninterrupted run's parameters, hyperparameters and histories;
    resume_from_checkpoint=True picks the last checkpoint."""
    kw = dict(
        num_train_epochs=4, save_strategy="steps", save_steps=1, per_device_train_batch_size=8
    )
    full = _mlp_trainer(tmp_path, **kw)
    full.train()
    out = tmp_path / "out"
    assert (out / "checkpoint-3" / STATE_NAME).is_file()
    assert not any(f.endswith(".tmp") for f in os.listdir(out / "checkpoint-3"))
    for ckpt, steps in (
        ("checkpoint-3", [4, 5, 6, 7, 8]),
        ("checkpoint-4", [5, 6, 7, 8]),
        (True, []),
    ):
        counter = _StepCounter()
        resumed = MargLikTrainer(
            model=MLP(seed=7).double(),
            args=_args(tmp_path, **kw),
            train_dataset=_mlp_data(),
            callbacks=[counter],
        )
        resumed.train(resume_from_checkpoint=str(out / ckpt) if ckpt is not True else True)
        assert counter.steps == steps
        assert resumed.margliks == full.margliks
        assert resumed.losses == full.losses
        assert resumed.marglik_update_steps == full.marglik_update_steps == [2, 4, 6, 8]
        assert torch.equal(
            resumed.marglik_loop.hyper.log_prior_prec, full.marglik_loop.hyper.log_prior_prec
        )
        assert torch.equal(resumed.laplace.prior_precision, full.laplace.prior_precision)
        for p, q in zip(resumed.model.parameters(), full.model.parameters()):
            assert torch.equal(p, q)
    os.remove(out / "checkpoint-5" / STATE_NAME)
    with pytest.raises(FileNotFoundError, match="not written by MargLikTrainer"):
        _mlp_trainer(tmp_path, **kw).train(resume_from_checkpoint=str(out / "checkpoint-5"))


class _Sabotage(TrainerCallback):
    """After optimizer step ``step``, scales the output layer by 30: the model fits the data far
    worse from then on, so the later updates' marginal likelihoods are worse than the one
    before (best update ≠ last update, by a wide margin)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.net[2].weight.mul_(30.0)


def test_restore_best_or_keep_last(tmp_path):
    """restore_best_marglik restores the best update's parameters; False keeps the last ones.
    The run is built so that the best update (step 4) is not the last (step 8)."""
    data = _mlp_data()
    kw = dict(dataset=data, num_train_epochs=4, callbacks=[_Sabotage(5)])
    last = _mlp_trainer(tmp_path / "a", restore_best_marglik=False, **kw)
    last.train()
    kw["callbacks"] = [_Sabotage(5)]
    best = _mlp_trainer(tmp_path / "b", **kw)
    best.train()
    assert last.margliks == best.margliks
    assert last.marglik_update_steps == [2, 4, 6, 8] and last.marglik_loop.best.step == 4
    assert min(last.margliks[6:]) > last.margliks[5] + 1.0  # the later updates are far worse
    for p, b in zip(best.marglik_loop.params, last.marglik_loop.best.params):
        assert torch.equal(p, b)
    assert torch.equal(
        best.laplace.mean, torch.cat([b.reshape(-1) for b in last.marglik_loop.best.params])
    )
    assert torch.equal(last.laplace.prior_precision, last.marglik_loop.hyper.prior_precision)
    assert not any(
        torch.equal(p, b) for p, b in zip(last.marglik_loop.params, last.marglik_loop.best.params)
    )


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_train_epochs=4),  # best update's fit reused
        dict(num_train_epochs=4, restore_best_marglik=False),  # last update's fit reused
        dict(num_train_epochs=3, marglik_frequency=2, restore_best_marglik=False),  # refit
    ],
)
def test_final_laplace_equals_a_fresh_fit(tmp_path, kw):
    """The Laplace approximation left after train() (reused from the update made at the final
    parameters, or refit when training went on after the last update) equals a new fit there
    with the final hyperparameters."""
    from hf_marglik import Laplace

    trainer = _mlp_trainer(tmp_path, dataset=_mlp_data(), **kw)
    trainer.train()
    lap = trainer.laplace
    fresh = Laplace(trainer.model, "classification", prior_precision=lap.prior_precision)
    fresh.fit(trainer.get_test_dataloader(trainer.train_dataset))
    assert torch.equal(lap.mean, fresh.mean)
    assert torch.allclose(
        lap.log_marginal_likelihood(), fresh.log_marginal_likelihood(), rtol=1e-12
    )
    assert float(lap.loss) == pytest.approx(float(fresh.loss), rel=1e-12)
    expected = (
        trainer.marglik_loop.best.prior_precision if trainer.args.restore_best_marglik else None
    )
    if expected is not None:
        assert torch.equal(lap.prior_precision, expected)


def test_regression_subset_and_saved_hyperparameters(tmp_path):
    """marglik_subset fits the curvature on half the data, rescaled to N; the noise is learned
    and logged; save_model writes the hyperparameters as JSON beside the model."""
    trainer = _mlp_trainer(
        tmp_path,
        n_out=1,
        dataset=_mlp_data(regression=True),
        likelihood="regression",
        num_train_epochs=2,
        marglik_subset=0.5,
    )
    trainer.train()
    assert trainer.laplace.n_data == 16 and len(trainer._fit_dataset) == 8
    logs = [e for e in trainer.state.log_history if "marglik" in e]
    assert len(logs) == 2 and "sigma_noise" in logs[-1]
    trainer.save_model(str(tmp_path / "final"))
    saved = json.loads((tmp_path / "final" / HYPERPARAMETERS_NAME).read_text())
    assert saved["likelihood"] == "regression" and saved["n_data"] == 16
    torch.testing.assert_close(
        torch.tensor(saved["prior_precision"], dtype=torch.float64),
        trainer.laplace.prior_precision,
    )
    assert saved["sigma_noise"] == pytest.approx(float(trainer.laplace.sigma_noise))
    assert set(saved["prior_precision_per_tensor"]) == {
        n for n, _ in trainer.model.named_parameters()
    }


# ---------------------------------------------------------------------- bad input
def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="marglik_frequency"):
        _args(tmp_path, marglik_frequency=-1)
    with pytest.raises(ValueError, match="n_hypersteps"):
        _args(tmp_path, n_hypersteps=0)
    with pytest.raises(ValueError, match="temperature"):
        _args(tmp_path, temperature=0.0)
    with pytest.raises(ValueError, match="hessian_structure"):
        _args(tmp_path, hessian_structure="block")
    with pytest.raises(ValueError, match="marglik_steps"):
        _args(tmp_path, marglik_steps=0)
    with pytest.raises(ValueError, match="marglik_subset"):
        _args(tmp_path, marglik_subset=2.5)
    both = dict(load_best_model_at_end=True, eval_strategy="epoch", save_strategy="epoch")
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        _args(tmp_path, restore_best_marglik=True, **both)
    assert _args(tmp_path, **both).restore_best_marglik is False  # the user's choice wins
    assert _args(tmp_path).restore_best_marglik is True
    with pytest.warns(UserWarning, match="weight_decay"):
        args = _args(tmp_path, weight_decay=0.1)
    assert args.weight_decay == 0.0
    with pytest.raises(TypeError, match="MargLikTrainingArguments"):
        MargLikTrainer(
            model=MLP(), args=TrainingArguments(output_dir=str(tmp_path), report_to="none")
        )


def test_bad_model_and_data(tmp_path):
    with pytest.raises(ValueError, match="no trainable parameters"):
        MargLikTrainer(model=MLP().requires_grad_(False), args=_args(tmp_path))
    data = DictDataset([{"input_ids": torch.randn(3), "target": torch.tensor(0)} for _ in range(8)])
    trainer = MargLikTrainer(model=MLP(), args=_args(tmp_path), train_dataset=data)
    with pytest.raises(KeyError, match="dict_key_y"):
        trainer.train()
    trainer = _mlp_trainer(tmp_path, num_train_epochs=2, n_epochs_burnin=5)
    with pytest.warns(UserWarning, match="n_epochs_burnin=5"):
        trainer.train()
    assert trainer.margliks == [] and trainer.laplace is not None
    with pytest.raises(ValueError, match="No checkpoint"):
        _mlp_trainer(tmp_path / "empty").train(resume_from_checkpoint=True)


def test_loss_is_logged_at_update_steps_too(tmp_path):
    """The hyperparameter logs made inside on_step_end do not swallow the Trainer's own loss
    line due at the same step (logging_steps=1: every step has one)."""
    trainer = _mlp_trainer(tmp_path, num_train_epochs=3)
    trainer.train()
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in trainer.state.log_history if "marglik" in e] == [2, 4, 6]
