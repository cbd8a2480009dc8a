"""One training run: check every input, fine-tune, evaluate on the test split, write outputs;
and the way back from a run's outputs to its model and posterior (:func:`load_trained`).

All checks (model path, sequence length, dataset columns, label range, likelihood and backend
against the task) run before the first training step; each raises a
:class:`~hf_marglik.recipe.errors.RecipeError`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..columns import MAX_EXACT_OUTPUTS
from .answer_token import AnswerTokenClassifier, answer_token_ids
from .arguments import DEFAULT_PROMPTS, TASK_LIKELIHOOD
from .config import RunConfig
from .data import TextData, check_label_range, load_text_data
from .encode import PadCollator, encode_splits
from .errors import RecipeError
from .metrics import CalibrationMeter, evaluate
from .models import (
    ModelSource,
    adapter_model,
    build_model,
    check_max_length,
    check_quantization,
    load_source,
)
from .report import (
    LEGACY_POSTERIOR_NAME,
    POSTERIOR_CONFIG_NAME,
    marglik_results,
    save_outputs,
)
from .resume import train as train_resumable


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
    if want == "causal_lm" and t.backend.value == "ggn" and vocab_size > MAX_EXACT_OUTPUTS:
        raise RecipeError(
            f"backend='ggn' needs one backward pass per vocabulary entry ({vocab_size:,}); "
            f"use --backend ggn-mc for {task}."
        )


def _trainer(cfg: RunConfig, model, datasets, collator, tokenizer=None):
    kwargs = {"data_collator": collator}
    if cfg.model.task == "sft":  # TRL's SFTTrainer or MargLikSFTTrainer, TRL's collator
        from .sft import trainer_class

        cls, kwargs = trainer_class(cfg.marglik), {"processing_class": tokenizer}
    elif cfg.marglik:
        from ..trainer import MargLikTrainer as cls
    else:
        from transformers import Trainer as cls
    try:  # MargLikTrainer checks the model against the settings (e.g. structure limits)
        return cls(
            model=model,
            args=cfg.training,
            train_dataset=datasets["train"],
            eval_dataset=datasets["validation"],
            **kwargs,
        )
    except (ValueError, TypeError) as e:
        raise RecipeError(str(e)) from None


def laplace_test_metrics(cfg: RunConfig, trainer, dataset) -> tuple[dict | None, ...]:
    """Accuracy, NLL, ECE, Brier of the Laplace predictive (``pred_type`` / ``link_approx`` of
    the training arguments) on the test split, for marglik runs with a classification
    likelihood: at the predictive's prior, and at the learned precisions when the predictive's
    prior was tuned (else None); and the MAP model's test metrics (as :func:`evaluate` gives
    them) when the GLM predictive's forward passes gave its logits, else None."""
    lm = TASK_LIKELIHOOD[cfg.model.task] == "causal_lm"
    if not cfg.marglik or not _has_posterior(trainer) or lm:
        return None, None, None
    from ..metrics import calibration_metrics

    meter = CalibrationMeter()
    loader = trainer.get_test_dataloader(dataset)
    by_prior, labels = laplace_test_probs(cfg, trainer, loader, map_meter=meter)
    keep = labels != -100
    metrics = {k: calibration_metrics(v[keep], labels[keep]) for k, v in by_prior.items()}
    map_metrics = meter.compute() if meter.n else None
    return metrics["predictive"], metrics.get("learned"), map_metrics


def _has_posterior(trainer) -> bool:
    """A final Laplace with a posterior (not one whose fit was not finite)."""
    lap = trainer.laplace
    return lap is not None and lap.fit_error is None


@torch.no_grad()
def map_logits(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """The MAP model's logits ``(n, K)`` (float32, CPU) and labels ``(n,)`` over ``loader``, in
    eval mode (classification)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    try:
        for batch in loader:
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            logits.append(model(**inputs).logits.float().cpu())
            labels.append(batch["labels"].cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def laplace_test_probs(
    cfg: RunConfig, trainer, loader, map_meter: CalibrationMeter | None = None
) -> tuple[dict, torch.Tensor]:
    """The Laplace predictive's class probabilities ``(n, K)`` (float64, CPU) over ``loader``, per
    prior: ``"predictive"`` (the predictive's prior: the tuned one with
    ``predictive_prior='gridsearch'``) and, when one was tuned, ``"learned"`` (the precisions
    the marginal likelihood learned); and the labels. For ``pred_type='glm'`` each batch's
    Jacobians are computed once and serve both priors (the same numbers as ``lap(batch, ...)``,
    each prior with its own generator seeded with the training seed). For ``pred_type='glm'``
    the Jacobians' forward passes are the MAP model's, in eval mode: their logits go to
    ``map_meter`` batch by batch (the MAP's test metrics without another pass)."""
    from ..predictive import categorical, glm_covariance_fn, glm_jacobians

    a, lap = cfg.training, trainer.laplace
    priors = {"predictive": lap.predictive_prior}
    if lap.predictive_prior_precision is not None:
        priors["learned"] = lap.prior
    generators = {k: torch.Generator(lap.device).manual_seed(a.seed) for k in priors}
    probs: dict[str, list] = {k: [] for k in priors}
    labels = []
    glm = getattr(a.pred_type, "value", a.pred_type) == "glm"
    isotropic = all(p.isotropic_per_tensor for p in priors.values())
    for batch in loader:
        inputs = {k: v.to(lap.device) for k, v in batch.items() if k != "labels"}
        if glm:
            logits, jac = glm_jacobians(lap, inputs)
            if map_meter is not None:
                map_meter.update(logits.float(), batch["labels"].to(logits.device))
            covariance = glm_covariance_fn(lap, jac, *logits.shape, isotropic=isotropic)
            del jac  # K-FAC keeps only the rotated rows (one copy of the Jacobians)
        for name, prior in priors.items():
            if glm:
                cov = covariance(prior)
                p = categorical(logits, cov, a.link_approx, a.predictive_samples, generators[name])
            else:
                tuned = lap.predictive_prior_precision
                lap.predictive_prior_precision = prior.values if name != "learned" else None
                try:
                    p = lap(inputs, pred_type=a.pred_type, n_samples=a.predictive_samples,
                            generator=generators[name])  # fmt: skip
                finally:
                    lap.predictive_prior_precision = tuned
            probs[name].append(p.detach().double().cpu())
        labels.append(batch["labels"].cpu())
    return {k: torch.cat(v) for k, v in probs.items()}, torch.cat(labels)


def predictions(cfg: RunConfig, trainer, model, encoded, test_loader) -> dict:
    """``--save_predictions`` (classification): the MAP logits and labels of the validation and
    test splits and, for marglik runs with a posterior, the Laplace predictive's test
    probabilities (what ``--save_predictions`` writes), with the metrics computed from them:
    ``validation``, ``test`` (as :func:`~hf_marglik.recipe.metrics.evaluate` gives them) and
    ``test_laplace`` (as :func:`laplace_test_metrics`)."""
    from ..metrics import calibration_metrics

    def meter(logits, labels):
        m = CalibrationMeter()
        m.update(logits, labels)
        return m.compute()

    out = {
        "class_names": None,
        "laplace": None,
        "test_laplace": None,
        "test_laplace_learned_prior": None,
    }
    for split, loader in (
        ("validation", trainer.get_eval_dataloader(encoded["validation"])),
        ("test", test_loader),
    ):
        logits, labels = map_logits(model, loader)
        out[split] = {"logits": logits, "labels": labels, "metrics": meter(logits, labels)}
    if cfg.marglik and _has_posterior(trainer):
        test = trainer.get_test_dataloader(encoded["test"])
        by_prior, labels = laplace_test_probs(cfg, trainer, test)
        keep = labels != -100
        for key, name in (
            ("test_laplace", "predictive"),
            ("test_laplace_learned_prior", "learned"),
        ):
            if name in by_prior:
                probs = by_prior[name]
                out[key] = {
                    "probs": probs,
                    "labels": labels,
                    "metrics": calibration_metrics(probs[keep], labels[keep]),
                }
        a = cfg.training
        out["laplace"] = {
            k: getattr(v, "value", v)
            for k, v in (("pred_type", a.pred_type), ("link_approx", a.link_approx))
        }
    return out


@dataclass
class Prepared:
    """A run's checked inputs: the model source, the texts, the encoded splits and the head."""

    source: ModelSource
    data: TextData
    encoded: dict
    num_labels: int | None
    class_ids: list[int] | None
    collator: PadCollator | None  # None for sft: TRL's own


def prepare(cfg: RunConfig) -> Prepared:
    """Check every input and encode the splits (no weights are loaded)."""
    m, d = cfg.model, cfg.data
    check_quantization(m, cfg.lora)
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
    if m.task == "sft":
        from .sft import chat_splits

        encoded, collator = chat_splits(data, source.tokenizer, d), None
    else:
        encoded = encode_splits(data, source.tokenizer, m.task, d, data.class_names)
        collator = PadCollator(source.tokenizer.pad_token_id)
    return Prepared(source, data, encoded, num_labels, class_ids, collator)


def load_trained(cfg: RunConfig, prepared: Prepared, output_dir: str | Path):
    """The model of a finished run of ``cfg`` with its adapter from ``output_dir`` (trainable,
    as in training), and its posterior (:class:`~hf_marglik.Laplace`,
    :meth:`~hf_marglik.Laplace.from_pretrained` of ``output_dir``; an older run's
    ``laplace_posterior.pt`` with :meth:`~hf_marglik.Laplace.load` and its deprecation notice;
    None when the run wrote none). No training data is read.

    The base model is rebuilt as in training (the same seed first, so that a
    ``tiny_random_model`` base is the same), the adapter loaded with peft
    ``PeftModel.from_pretrained(..., is_trainable=True)``, and an ``answer_token`` model wrapped
    in :class:`~hf_marglik.recipe.answer_token.AnswerTokenClassifier` again, so that the
    trainable parameters carry the names the posterior was saved with.
    """
    from peft import PeftModel
    from transformers import set_seed

    from ..laplace import Laplace

    if not cfg.lora.use_lora:
        raise RecipeError("load_trained needs a LoRA run (use_lora: true).")
    out = Path(output_dir)
    set_seed(cfg.training.seed)
    base = build_model(
        cfg.model,
        dataclasses.replace(cfg.lora, use_lora=False),
        prepared.source,
        prepared.num_labels,
        prepared.class_ids,
        **_placement(cfg),
    )
    model = PeftModel.from_pretrained(adapter_model(base), str(out), is_trainable=True)
    if cfg.model.task == "answer_token":
        model = AnswerTokenClassifier(model, prepared.class_ids)
    model.eval()
    if (out / POSTERIOR_CONFIG_NAME).is_file():
        return model, Laplace.from_pretrained(out, model)
    if (out / LEGACY_POSTERIOR_NAME).is_file():
        return model, Laplace.load(out / LEGACY_POSTERIOR_NAME, model)
    return model, None


def _quantized(m) -> str:
    """How a k-bit base was quantised, for the results' model name."""
    if m.kbit == 8:
        return " (8-bit base)"
    double = ", double quant" if m.bnb_4bit_use_double_quant else ""
    compute = m.bnb_4bit_compute_dtype or m.model_dtype
    return f" (4-bit {m.bnb_4bit_quant_type} base, {compute} compute{double})"


def _placement(cfg: RunConfig) -> dict:
    """``build_model``'s keywords from the training arguments: gradient checkpointing, and for a
    k-bit base the device (the Trainer does not move a quantised model)."""
    device = str(cfg.training.device) if cfg.model.kbit is not None else None
    return {"gradient_checkpointing": bool(cfg.training.gradient_checkpointing), "device": device}


def run(cfg: RunConfig) -> dict:
    """Train and evaluate as configured; return the results written to ``metrics.json``."""
    return train_run(cfg).results


@dataclass
class Finished:
    """A finished run: what ``metrics.json`` holds, the trainer, the trained model and the
    checked inputs."""

    results: dict
    trainer: object
    model: torch.nn.Module
    prepared: Prepared


def train_run(cfg: RunConfig) -> Finished:
    """:func:`run`, keeping the trainer, the model and the inputs for the caller."""
    from transformers import set_seed

    start = time.time()
    m, d = cfg.model, cfg.data
    prep = prepare(cfg)
    data, encoded = prep.data, prep.encoded

    set_seed(cfg.training.seed)
    model = build_model(
        m, cfg.lora, prep.source, prep.num_labels, prep.class_ids, **_placement(cfg)
    )
    trainer = _trainer(cfg, model, encoded, prep.collator, prep.source.tokenizer)
    train_start, train_cpu_start = time.time(), time.process_time()
    train_resumable(trainer)  # resume_from_checkpoint; SIGTERM: checkpoint, then stop
    train_time = time.time() - train_start
    train_cpu = time.process_time() - train_cpu_start  # this process, all threads

    loader = trainer.get_test_dataloader(encoded["test"])
    if not cfg.training.disable_tqdm:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="Test")
    preds = None
    lm = TASK_LIKELIHOOD[m.task] == "causal_lm"  # per-token metrics (causal_lm, sft)
    if d.save_predictions and not lm:
        preds = predictions(cfg, trainer, model, encoded, loader)
        test = preds["test"]["metrics"]
        test_laplace = preds["test_laplace"]["metrics"] if preds["test_laplace"] else None
        learned = preds["test_laplace_learned_prior"]
        test_laplace_learned = learned["metrics"] if learned else None
        preds["class_names"] = data.class_names
    else:
        test_laplace, test_laplace_learned, test = laplace_test_metrics(
            cfg, trainer, encoded["test"]
        )
        if test is None:  # no GLM predictive gave the MAP's logits
            test = evaluate(model, loader, "causal_lm" if lm else m.task)

    results = {
        "mode": "marglik" if cfg.marglik else "plain",
        "config_file": cfg.config_file,
        "model": m.model_name_or_path
        + (" (tiny random)" if m.tiny_random_model else "")
        + (_quantized(m) if m.kbit else ""),
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
        "test_laplace_learned_prior": test_laplace_learned,
        "validation": preds["validation"]["metrics"] if preds else None,
        "train_runtime_s": train_time,
        "train_cpu_s": train_cpu,
        "marglik": marglik_results(trainer) if cfg.marglik else None,
        "output_dir": cfg.training.output_dir,
        "log_history": trainer.state.log_history,
    }
    results["total_runtime_s"] = time.time() - start
    results["total_cpu_s"] = time.process_time()
    save_outputs(trainer, model, results, cfg.training.output_dir, predictions=preds)
    print("\n" + results["summary"])
    return Finished(results, trainer, model, prep)
