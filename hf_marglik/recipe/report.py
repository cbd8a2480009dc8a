"""What a run leaves in ``output_dir``: adapter, hyperparameters, posterior, metrics.json, plot,
summary."""

from __future__ import annotations

import json
from pathlib import Path

from ..pretrained import CONFIG_NAME, LEGACY_NAME, TENSORS_NAME
from ..tensor_files import load_tree, save_tree
from .models import adapter_model
from .plotting import plot_training

METRICS_NAME = "metrics.json"
PLOT_NAME = "training.png"
PREDICTIONS_NAME = "predictions.safetensors"
"""``--save_predictions``: the tensors of the predictions (with :data:`PREDICTIONS_JSON_NAME`;
:func:`load_predictions` reads both): ``{"class_names", "validation": {"logits", "labels",
"metrics"}, "test": {...}, "test_laplace": {"probs", "labels", "metrics"} | None,
"test_laplace_learned_prior": ... | None, "laplace": {"pred_type", "link_approx"} | None}``
(MAP logits float32, probabilities float64)."""
PREDICTIONS_JSON_NAME = "predictions.json"
"""``--save_predictions``: everything of the predictions but the tensors (class names, metrics),
with references into :data:`PREDICTIONS_NAME`."""
LEGACY_PREDICTIONS_NAME = "predictions.pt"
"""The pickle of older runs' ``--save_predictions`` (still read by :func:`load_predictions`)."""
POSTERIOR_NAME = TENSORS_NAME
"""The fitted posterior of a ``--marglik`` run, with :data:`POSTERIOR_CONFIG_NAME`
(:meth:`hf_marglik.Laplace.save_pretrained` into the adapter's folder); it loads with
:meth:`hf_marglik.Laplace.from_pretrained` over the model with the adapter, without the
training data."""
POSTERIOR_CONFIG_NAME = CONFIG_NAME
LEGACY_POSTERIOR_NAME = LEGACY_NAME
"""Older runs' pickle-based posterior (read by ``Laplace.load``, with a deprecation notice)."""


def save_outputs(
    trainer, model, results: dict, output_dir: str | Path, predictions: dict | None = None
) -> dict[str, str]:
    """Write the adapter (peft ``save_pretrained``), the learned hyperparameters and the fitted
    posterior (marglik runs, when the final fit was finite), the predictions (when
    ``predictions`` is given: :data:`PREDICTIONS_NAME` and :data:`PREDICTIONS_JSON_NAME`), the
    training plot and ``metrics.json`` last (with ``files`` and the ``summary``, which are set
    here); return the files' paths. No pickle."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(model, out)
    files = {"adapter": str(out)}
    marglik = results.get("marglik")
    if marglik is not None:
        from ..checkpoint import HYPERPARAMETERS_NAME

        path = out / HYPERPARAMETERS_NAME
        path.write_text(json.dumps(trainer.hyperparameters(), indent=2))
        files["hyperparameters"] = str(path)
        lap = trainer.laplace  # the final fit, at the saved adapter's parameters
        if lap is not None and lap.fit_error is None:
            lap.save_pretrained(out)
            files["posterior"] = str(out / POSTERIOR_NAME)
            files["posterior_config"] = str(out / POSTERIOR_CONFIG_NAME)
    if predictions is not None:
        save_tree(predictions, out / PREDICTIONS_NAME, out / PREDICTIONS_JSON_NAME)
        files["predictions"] = str(out / PREDICTIONS_NAME)
    title = f"{results['model']} · {results['task']} · {results['mode']}"
    plot = plot_training(
        trainer.state.log_history,
        out / PLOT_NAME,
        neg_log_margliks=marglik["neg_log_marglik_history"] if marglik else None,
        title=title,
    )
    files["plot"] = str(plot)
    files["metrics"] = str(out / METRICS_NAME)
    results["files"] = files
    results["summary"] = summary(results)
    (out / METRICS_NAME).write_text(json.dumps(results, indent=2, default=str))
    return files


def load_predictions(folder: str | Path) -> dict:
    """The ``--save_predictions`` of the run in ``folder`` (see :data:`PREDICTIONS_NAME`); an
    older run's ``predictions.pt`` is read too."""
    folder = Path(folder)
    if (folder / PREDICTIONS_JSON_NAME).is_file():
        return load_tree(folder / PREDICTIONS_NAME, folder / PREDICTIONS_JSON_NAME)
    import torch

    return torch.load(folder / LEGACY_PREDICTIONS_NAME, weights_only=False)


def save_adapter(model, out: Path) -> None:
    """peft ``save_pretrained`` of the adapter (the whole model when LoRA is off)."""
    from peft import PeftModel

    inner = adapter_model(model)
    if isinstance(inner, PeftModel):  # embeddings are never trained here: don't look for them
        inner.save_pretrained(str(out), save_embedding_layers=False)
    else:
        inner.save_pretrained(str(out))


def marglik_results(trainer) -> dict:
    """The marginal-likelihood history and learned precisions of a finished MargLikTrainer;
    ``posterior_error``: why the run has no posterior (its final fit was not finite), else
    None."""
    hyper = trainer.hyperparameters()
    per_tensor = hyper["prior_precision_per_tensor"]
    values = list(per_tensor.values())
    return {
        # the evidence of the kept model (its posterior's), and per data point
        "log_marglik": trainer.log_marglik,
        "log_marglik_per_datum": trainer.log_marglik_per_datum,
        "log_marglik_best": trainer.best_marglik,
        "neg_log_marglik_history": list(trainer.margliks),
        "update_steps": list(trainer.marglik_update_steps),
        "epoch_losses": list(trainer.losses),
        "n_data": trainer.n_data,
        "prior_precision_mean": sum(values) / len(values),
        "prior_precision_min": min(values),
        "prior_precision_max": max(values),
        "prior_precision_per_tensor": per_tensor,
        "sigma_noise": hyper["sigma_noise"],
        "predictive_prior_scale": _predictive_prior_scale(trainer.laplace),
        "posterior_error": None if trainer.laplace is None else trainer.laplace.fit_error,
    }


def _predictive_prior_scale(lap) -> float | None:
    """The factor of a tuned predictive prior over the learned one (None when not tuned)."""
    if lap is None or lap.predictive_prior_precision is None:
        return None
    return float((lap.predictive_prior_precision / lap.prior_precision).mean())


def summary(results: dict) -> str:
    """One paragraph: what was trained, how long it took, how well the MAP model does."""
    test = results["test"]
    trainers = ("MargLikTrainer", "transformers.Trainer")
    if results["task"] == "sft":
        trainers = ("MargLikSFTTrainer", "trl.SFTTrainer")
    text = (
        f"Trained {results['model']} ({results['task']}, "
        f"{results['trainable_parameters']:,} trainable parameters) with "
        f"{trainers[0] if results['mode'] == 'marglik' else trainers[1]} on "
        f"{results['n_train']} training examples for {results['epochs']:g} epochs in "
        f"{results['train_runtime_s']:.0f} s ({results['total_runtime_s']:.0f} s in all). "
        f"Test ({test['n_predictions']} predictions): accuracy {test['accuracy']:.3f}, "
        f"NLL {test['nll']:.3f}, ECE {test['ece']:.3f}, Brier {test['brier']:.3f}."
    )
    lap = results.get("test_laplace")
    if lap is not None:
        text += (
            f" Laplace predictive: accuracy {lap['accuracy']:.3f}, NLL {lap['nll']:.3f}, "
            f"ECE {lap['ece']:.3f}, Brier {lap['brier']:.3f}."
        )
    m = results.get("marglik")
    if m is not None and m["log_marglik_best"] is not None:
        text += (
            f" Best log marginal likelihood {m['log_marglik_best']:.1f} over "
            f"{len(m['update_steps'])} updates; learned prior precisions "
            f"{m['prior_precision_min']:.3g}..{m['prior_precision_max']:.3g} "
            f"(mean {m['prior_precision_mean']:.3g})."
        )
    elif m is not None:
        text += " No marginal-likelihood update fell within training (see n_epochs_burnin)."
    if m is not None and m.get("posterior_error"):
        text += f" No posterior saved: the {m['posterior_error']}."
    else:
        text += f" Weight decay {results['weight_decay']:g}."
    text += f" Outputs in {results['output_dir']}"
    posterior = results.get("files", {}).get("posterior")
    if posterior is not None:
        text += (
            f"; the fitted posterior is {Path(posterior).name} with {POSTERIOR_CONFIG_NAME} "
            "(hf_marglik.Laplace.from_pretrained, with the adapter; no training data needed)"
        )
    return text + "."
