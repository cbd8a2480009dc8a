"""One training run: check every input, fine-tune, evaluate on the test split, write outputs.

All checks (model path, sequence length, dataset columns, label range, likelihood and backend
against the task) run before the first training step; each raises a
:class:`~hf_marglik.recipe.errors.RecipeError`.
"""

from __future__ import annotations

import time

import torch

from .answer_token import answer_token_ids
from .arguments import DEFAULT_PROMPTS, TASK_LIKELIHOOD
from .config import RunConfig
from .data import check_label_range, load_text_data
from .encode import PadCollator, encode_splits
from .errors import RecipeError
from .metrics import evaluate
from .models import build_model, check_max_length, load_source
from .report import marglik_results, save_outputs, summary


def check_marglik_settings(cfg: RunConfig, vocab_size: int) -> None:
    """The likelihood must be the task's; an exact GGN over a large vocabulary is refused."""
    if not cfg.marglik:
        return
    t, task = cfg.training, cfg.model.task
    want = TASK_LIKELIHOOD[task]
    if t.likelihood.value != want:
        raise RecipeError(
            f"task={task!r} needs likelihood={want!r}, got {t.likelihood.value!r}; "
            f"set --likelihood {want}."
        )
    if task == "causal_lm" and t.backend.value == "ggn" and vocab_size > 1000:
        raise RecipeError(
            f"backend='ggn' needs one backward pass per vocabulary entry ({vocab_size:,}); "
            "use --backend ggn-mc for causal_lm."
        )


def _trainer(cfg: RunConfig, model, datasets, collator):
    if cfg.marglik:
        from ..trainer import MargLikTrainer as cls
    else:
        from transformers import Trainer as cls
    return cls(
        model=model,
        args=cfg.training,
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        data_collator=collator,
    )


def laplace_test_metrics(cfg: RunConfig, trainer, dataset) -> dict | None:
    """Accuracy, NLL, ECE, Brier of the Laplace predictive (``pred_type`` / ``link_approx`` of
    the training arguments) on the test split: marglik runs with a classification likelihood."""
    if not cfg.marglik or trainer.laplace is None or cfg.model.task == "causal_lm":
        return None
    from ..evaluation import calibration_report

    a = cfg.training
    report = calibration_report(
        trainer.laplace,
        trainer.get_test_dataloader(dataset),
        a.pred_type,
        a.link_approx,
        a.predictive_samples,
        torch.Generator().manual_seed(a.seed),
    )
    return {k.removeprefix("laplace_"): v for k, v in report.items() if k.startswith("laplace_")}


def run(cfg: RunConfig) -> dict:
    """Train and evaluate as configured; return the results written to ``metrics.json``."""
    from transformers import set_seed

    start = time.time()
    m, d = cfg.model, cfg.data
    source = load_source(m)
    check_max_length(source, d.max_seq_length)
    check_marglik_settings(cfg, len(source.tokenizer))
    template = d.prompt_template or DEFAULT_PROMPTS[m.task]
    data = load_text_data(d, need_label=m.task != "causal_lm" or "{label_name}" in template)
    num_labels, class_ids = None, None
    if m.task != "causal_lm":
        num_labels = m.num_labels or len(data.class_names)
        check_label_range(data, num_labels)
        if m.task == "answer_token":
            if num_labels != len(data.class_names):
                raise RecipeError(
                    f"answer_token reads one token per class name: num_labels={num_labels} but "
                    f"there are {len(data.class_names)} class names."
                )
            class_ids = answer_token_ids(source.tokenizer, data.class_names, d.answer_prefix)
    encoded = encode_splits(data, source.tokenizer, m.task, d, data.class_names)

    set_seed(cfg.training.seed)
    model = build_model(m, cfg.lora, source, num_labels, class_ids)
    trainer = _trainer(cfg, model, encoded, PadCollator(source.tokenizer.pad_token_id))
    train_start = time.time()
    trainer.train()
    train_time = time.time() - train_start

    loader = trainer.get_test_dataloader(encoded["test"])
    if not cfg.training.disable_tqdm:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="Test")
    test = evaluate(model, loader, m.task)
    test_laplace = laplace_test_metrics(cfg, trainer, encoded["test"])

    results = {
        "mode": "marglik" if cfg.marglik else "plain",
        "config_file": cfg.config_file,
        "model": m.model_name_or_path + (" (tiny random)" if m.tiny_random_model else ""),
        "task": m.task,
        "class_names": data.class_names,
        "n_train": len(encoded["train"]),
        "n_validation": len(encoded["validation"]),
        "n_test": len(encoded["test"]),
        "max_seq_length": d.max_seq_length,
        "epochs": cfg.training.num_train_epochs,
        "weight_decay": cfg.training.weight_decay,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "test": test,
        "test_laplace": test_laplace,
        "train_runtime_s": train_time,
        "marglik": marglik_results(trainer) if cfg.marglik else None,
        "output_dir": cfg.training.output_dir,
        "log_history": trainer.state.log_history,
    }
    results["total_runtime_s"] = time.time() - start
    results["summary"] = summary(results)
    save_outputs(trainer, model, results, cfg.training.output_dir)
    print("\n" + results["summary"])
    return results
