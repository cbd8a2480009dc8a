"""Post-hoc arms of the comparison study (:mod:`hf_marglik.recipe.study`), computed on a finished
plain run without training again.

- :func:`temperature_scaling` (Guo et al., ICML 2017): one temperature ``T > 0`` for the MAP
  logits, fitted on the validation split by minimising its NLL,
  ``T* = argmin_T −(1/n) Σ log softmax(z_n / T)_{y_n}``, with L-BFGS on ``log T`` in float64
  (strong-Wolfe line search, from ``T = 1``); the test probabilities are ``softmax(z / T*)``.
  It reads the run's ``--save_predictions`` (``predictions.safetensors`` / ``.json``): no
  model is loaded.
- :func:`posthoc_laplace` (Laplace-LoRA's protocol, Yang et al., ICLR 2024): the plain run's
  adapter is loaded (:func:`~hf_marglik.recipe.run.load_trained`), a K-FAC Laplace with the
  config's curvature backend is fitted on the training split at the MAP, and the prior
  precision is tuned after training, with laplace-torch's ``optimize_prior_precision`` API:
  ``method="marglik"`` (Adam on the log precision, laid out as the config's
  ``prior_structure``, from ``prior_prec_init``) and ``method="gridsearch"`` (a scalar
  precision from a log grid, by the NLL of the GLM probit predictive on the validation split).
  Each variant's test metrics are those of the GLM predictive with the probit link. One fit
  serves both variants, and one test pass (the Jacobians computed once) both variants of a
  target; each variant's compute is the fit plus its own tuning and that test pass (what it
  costs alone).
  The same two tunings of a last-layer Laplace (``subset_of_weights="last_layer"``:
  laplace-torch's default for post-hoc Laplace over a trained head, Laplace-LoRA's last-layer
  variant over the last adapted layer's LoRA where there is no head; the variants
  ``last_layer_marglik``, ``last_layer_gridsearch``), from the restriction of the same fit
  (:meth:`~hf_marglik.Laplace.restricted_to`: the numbers of a last-layer fit).
- :func:`marglik_predictive`: the posterior a ``--marglik`` run saved, its predictive's prior
  tuned again on the validation split as the trainer does (``predictive_prior="gridsearch"``,
  :func:`~hf_marglik.tuning.tune_predictive_prior`), over each ``predictive_subset_of_weights``
  (variants ``all`` and ``last_layer``); the test predictive as
  ``train.py`` computes ``test_laplace`` (:func:`~hf_marglik.recipe.run.laplace_test_probs`).
  The variant of the run's own setting reproduces its ``test_laplace``.

Metrics: from logits with :class:`~hf_marglik.recipe.metrics.CalibrationMeter` (log-softmax,
so a very confident wrong prediction keeps its full NLL), from probabilities with
:func:`hf_marglik.calibration_metrics`; both 15 bins.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import torch

from .metrics import CalibrationMeter

TEMPERATURE_SETTINGS = {"init_temperature": 1.0, "optimizer": "LBFGS", "max_iter": 100}
POSTHOC_LAPLACE_SETTINGS = {
    "likelihood": "classification",
    "hessian_structure": "kron",
    "backend": "the config's backend",
    "fit_split": "train",
    "marglik": {"n_steps": 100, "lr": 0.1, "prior_structure": "the config's prior_structure"},
    "gridsearch": {
        "val_split": "validation",
        "grid_size": 100,
        "log_prior_prec_min": -4,
        "log_prior_prec_max": 4,
    },
    "predictive": {"pred_type": "glm", "link_approx": "probit"},
    "last_layer": "the restriction of the same fit to the head, or without one to the LoRA of "
    "the last adapted layer",
}
MARGLIK_PREDICTIVE_SETTINGS = {
    "posterior": "the run's laplace_posterior.pt",
    "tuning": "predictive_prior='gridsearch' (relative grid, validation NLL)",
    "subsets": ["all", "last_layer"],
}
"""What the post-hoc arms do; part of the study's fingerprint (a change is another study)."""


def logit_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL, ECE (15 bins), Brier of ``softmax(logits)``, as the runs report them."""
    meter = CalibrationMeter()
    meter.update(logits, labels)
    return meter.compute()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """``T* = argmin_T`` of the mean NLL of ``softmax(logits / T)`` (L-BFGS on ``log T``,
    float64, from ``T = 1``)."""
    z, y = logits.double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=TEMPERATURE_SETTINGS["max_iter"], line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not (t > 0 and t < float("inf")):
        raise ValueError(f"temperature scaling diverged (T={t}).")
    return t


def temperature_scaling(run_dir: Path) -> tuple[dict, dict]:
    """Temperature scaling of the MAP of the run in ``run_dir`` (its ``--save_predictions``):
    ``(result, tensors)`` with the fitted temperature, validation NLL before and after and the
    test metrics under ``variants["temperature"]``; ``tensors`` holds the test probabilities."""
    from .report import load_predictions

    p = load_predictions(run_dir)
    val, test = p["validation"], p["test"]
    t = fit_temperature(val["logits"], val["labels"])
    scaled = test["logits"].double() / t
    result = {
        "temperature": t,
        "validation_nll_before": logit_metrics(val["logits"], val["labels"])["nll"],
        "validation_nll_after": logit_metrics(val["logits"].double() / t, val["labels"])["nll"],
        "variants": {"temperature": {"test": logit_metrics(scaled, test["labels"])}},
    }
    tensors = {"temperature": torch.softmax(scaled, -1), "labels": test["labels"]}
    return result, tensors


class _OnDevice:
    """A re-iterable view of a loader whose tensors are moved to ``device``."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __iter__(self):
        for batch in self.loader:
            yield {k: v.to(self.device) for k, v in batch.items()}

    def __len__(self):
        return len(self.loader)


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> dict[str, float]:
    wall, cpu = _clock()
    return {"wall_s": wall - start[0], "cpu_s": cpu - start[1]}


def _predictives(lap, priors: dict, loader) -> tuple[dict, torch.Tensor]:
    """The GLM predictive of ``lap`` on ``loader`` at each prior precision of ``priors``
    (name -> precision), what ``lap(x, pred_type="glm", link_approx=...)`` gives at that
    ``prior_precision``: one Jacobian pass, each batch's Jacobians rotated once and rescaled
    per prior (:func:`~hf_marglik.predictive.glm_covariance_fn`). Leaves ``lap.prior_precision``
    at the last prior. Returns the probabilities per name and the labels."""
    from ..predictive import categorical, glm_covariance_fn, glm_jacobians
    from ..prior import Prior

    s = POSTHOC_LAPLACE_SETTINGS["predictive"]
    if s["pred_type"] != "glm":
        raise ValueError("the post-hoc arms' predictive is the GLM's")
    isotropic = all(Prior(p.reshape(-1), lap.sizes).isotropic_per_tensor for p in priors.values())
    probs: dict[str, list] = {name: [] for name in priors}
    labels = []
    for batch in loader:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits, jac = glm_jacobians(lap, inputs)
        covariance = glm_covariance_fn(lap, jac, *logits.shape, isotropic=isotropic)
        del jac
        for name, prior in priors.items():
            lap.prior_precision = prior
            p = categorical(logits, covariance(), s["link_approx"], 100, None)
            probs[name].append(p.detach().double().cpu())
        labels.append(batch["labels"].cpu())
    return {name: torch.cat(p) for name, p in probs.items()}, torch.cat(labels)


def posthoc_laplace(run_dir: Path, train_args: list[str]) -> tuple[dict, dict]:
    """Post-hoc K-FAC Laplace on the plain run in ``run_dir`` (made by ``scripts/train.py
    *train_args``), prior precision tuned after training by ``method="marglik"`` and by
    ``method="gridsearch"``: ``(result, tensors)``, the result with the fit's timing, the MAP's
    test metrics (a check: the plain run's own) and per variant the tuned precisions, the log
    marginal likelihood there, the tuning time and the GLM probit predictive's test metrics;
    ``tensors`` holds each variant's test probabilities."""
    from torch.utils.data import DataLoader
    from transformers.utils import logging as hf_logging

    from .. import Laplace, calibration_metrics
    from .config import parse_args
    from .run import load_trained, map_logits, prepare

    with contextlib.redirect_stdout(io.StringIO()):  # the weight-decay notice of --marglik
        cfg = parse_args([*train_args, "--marglik", "--output_dir", str(run_dir)])
    t = cfg.training
    prep = prepare(cfg)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report of the new head's (restored) weights
    try:
        model, _ = load_trained(cfg, prep, run_dir)
    finally:
        hf_logging.set_verbosity(verbosity)
    if torch.cuda.is_available():
        model = model.cuda()
    device = next(model.parameters()).device

    def loader(split: str, batch_size: int):
        return _OnDevice(
            DataLoader(prep.encoded[split], batch_size=batch_size, collate_fn=prep.collator),
            device,
        )

    train = loader("train", t.per_device_train_batch_size)
    val = loader("validation", t.per_device_eval_batch_size)
    test = loader("test", t.per_device_eval_batch_size)
    s = POSTHOC_LAPLACE_SETTINGS
    structure = getattr(t.prior_structure, "value", t.prior_structure)

    start = _clock()
    lap = Laplace(
        model,
        s["likelihood"],
        hessian_structure=s["hessian_structure"],
        backend=t.backend,
        kfac_approx=t.kfac_approx,
        n_mc_samples=t.n_mc_samples,
        prior_precision=t.prior_prec_init,
        prior_structure=structure,
        seed=t.seed,
    )
    lap.fit(train)
    fit = _since(start)
    logits, labels = map_logits(model, test)
    result = {
        "fit": fit,
        "n_data": lap.n_data,
        "map_test": logit_metrics(logits, labels),
        "variants": {},
    }
    tensors = {"labels": labels}
    tuning = {
        "marglik": dict(
            method="marglik",
            n_steps=s["marglik"]["n_steps"],
            lr=s["marglik"]["lr"],
            init_prior_prec=t.prior_prec_init,
            prior_structure=structure,
        ),
        "gridsearch": dict(
            method="gridsearch",
            val_loader=val,
            link_approx=s["predictive"]["link_approx"],
            grid_size=s["gridsearch"]["grid_size"],
            log_prior_prec_min=s["gridsearch"]["log_prior_prec_min"],
            log_prior_prec_max=s["gridsearch"]["log_prior_prec_max"],
        ),
    }
    targets = {"": lap, "last_layer_": lap.restricted_to("last_layer")}
    for prefix, target in targets.items():
        priors, variants = {}, {}
        for name, kwargs in tuning.items():
            target.prior_precision = t.prior_prec_init  # each variant starts from the same prior
            start = _clock()
            target.optimize_prior_precision(pred_type=s["predictive"]["pred_type"], **kwargs)
            priors[name] = target.prior_precision.clone()
            variants[prefix + name] = {
                "prior_precision": target.prior_precision.detach().double().cpu().tolist(),
                "log_marglik": float(target.log_marginal_likelihood()),
                "tuning": _since(start),
            }
        # one test pass serves the target's variants; each is charged all of it (its cost alone)
        start = _clock()
        by_prior, y = _predictives(target, priors, test)
        predict = _since(start)
        for name, probs in by_prior.items():
            v = variants[prefix + name]
            result["variants"][prefix + name] = {
                "test": calibration_metrics(probs[y != -100], y[y != -100]),
                **v,
                "predictive": predict,
                "extra": {k: fit[k] + v["tuning"][k] + predict[k] for k in ("wall_s", "cpu_s")},
            }
            tensors[prefix + name] = probs
    return result, tensors


def marglik_predictive(run_dir: Path, train_args: list[str]) -> tuple[dict, dict]:
    """The saved posterior of the ``--marglik`` run in ``run_dir`` (made by ``scripts/train.py
    *train_args``), its predictive's prior tuned on the validation split as the trainer does,
    per ``predictive_subset_of_weights``: ``(result, tensors)`` with per variant the factor on
    the learned precisions, the tuning and test-predictive timings and the test metrics (as
    ``test_laplace``); ``tensors`` holds each variant's test probabilities."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader
    from transformers.utils import logging as hf_logging

    from .. import calibration_metrics
    from ..tuning import tune_predictive_prior
    from .config import parse_args
    from .run import laplace_test_probs, load_trained, prepare

    with contextlib.redirect_stdout(io.StringIO()):  # the weight-decay notice of --marglik
        cfg = parse_args([*train_args, "--output_dir", str(run_dir)])
    a = cfg.training
    prep = prepare(cfg)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, lap = load_trained(cfg, prep, run_dir)
    finally:
        hf_logging.set_verbosity(verbosity)
    if lap is None:
        raise ValueError(f"{run_dir} holds no laplace_posterior.pt (not a --marglik run).")
    device = next(model.parameters()).device

    def loader(split: str):
        dl = DataLoader(
            prep.encoded[split], batch_size=a.per_device_eval_batch_size, collate_fn=prep.collator
        )
        return _OnDevice(dl, device)

    val, test = loader("validation"), loader("test")
    result: dict = {"run_setting": a.predictive_subset_of_weights.value, "variants": {}}
    tensors: dict = {}
    for subset in MARGLIK_PREDICTIVE_SETTINGS["subsets"]:
        lap.predictive_subset_of_weights = subset
        lap.predictive_prior_precision = None
        start = _clock()
        scale = tune_predictive_prior(lap, val, a.pred_type, a.link_approx, a.predictive_samples)
        tuned = _since(start)
        start = _clock()
        by_prior, labels = laplace_test_probs(cfg, SimpleNamespace(laplace=lap), test)
        predict = _since(start)
        keep = labels != -100
        probs = by_prior["predictive"]
        result["variants"][subset] = {
            "test": calibration_metrics(probs[keep], labels[keep]),
            "predictive_prior_scale": scale,
            "tuning": tuned,
            "predictive": predict,
            "extra": {
                "wall_s": tuned["wall_s"] + predict["wall_s"],
                "cpu_s": tuned["cpu_s"] + predict["cpu_s"],
            },
        }
        tensors[subset] = probs
        tensors["labels"] = labels
    return result, tensors
