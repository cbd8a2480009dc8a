"""``MargLikTrainer``: marginal-likelihood training (Immer et al., ICML 2021, Algorithm 1) inside
``transformers.Trainer``.

The loss is the log joint per data point, computed from the logits (the targets are never given
to the model): for a micro-batch ``b`` of an optimizer step over ``n`` data points,

    loss_b = (Σ_{i∈b} ℓ_i + n_b · ½θᵀPθ / (N·c)) / n

(``ℓ`` cross-entropy, or squared error for regression; ``c`` laplace-torch's ``crit_factor``;
``N`` the data points of the training set), so that gradient accumulation gives the same
gradient as one large batch. After every ``marglik_frequency``-th epoch (or every
``marglik_steps`` optimizer steps) once ``n_epochs_burnin`` epochs are done, a
:class:`~hf_marglik.Laplace` is fit over the trainable parameters and the prior precision (and
the noise, for regression) take ``n_hypersteps`` Adam steps on the negative log marginal
likelihood. The update runs in ``on_step_end``, before the Trainer logs and saves, so a
checkpoint always holds the hyperparameters that the next step trains with.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .batches import call_model, nll_sum, split_batch, targets_for
from .evaluation import calibration_report
from .hyper import HyperOptimizer, batch_targets, count_data_points
from .laplace import Laplace
from .options import Likelihood, PriorStructure
from .params import trainable_parameters
from .training_args import MargLikTrainingArguments

STATE_NAME = "marglik_state.pt"
"""Extra training state in each checkpoint folder (hyper-optimizer, best model, histories)."""
HYPERPARAMETERS_NAME = "marglik_hyperparameters.json"
"""The learned hyperparameters, written by ``save_model`` beside the model or adapter."""


class _MargLikCallback(TrainerCallback):
    """Runs the trainer's marginal-likelihood step after optimizer steps and writes its state
    into each checkpoint."""

    def __init__(self, trainer: MargLikTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._on_step_end()

    def on_save(self, args, state, control, **kwargs):
        self.trainer._on_save()


class MargLikTrainer(Trainer):
    """A ``Trainer`` that learns the prior precision (and observation noise) by the Laplace
    marginal likelihood while it trains the model on the log joint.

    Takes the Trainer's arguments, with ``args`` a :class:`MargLikTrainingArguments`. After
    :meth:`train`:

    - ``laplace``: the :class:`~hf_marglik.Laplace` approximation, refit at the final (by
      default the best-marglik) parameters and hyperparameters;
    - ``margliks``: negative log marginal likelihoods, one per hyper-step (as laplace-torch);
    - ``losses``: the mean training loss (log joint per data point) of each completed epoch;
    - ``marglik_update_steps``: the global steps after which the hyperparameters were updated;
    - ``n_data``: the data points the likelihood counts (sequences, or target tokens).

    Logged after every update (through ``log``, so every ``report_to`` target gets them):
    ``marglik`` (the log marginal likelihood), ``prior_prec_mean/min/max``,
    ``prior_prec/<tensor>`` (layerwise: the value; diag: the tensor's mean) and ``sigma_noise``
    (regression). ``eval_loss`` is the held-out likelihood term per data point, without the prior.

    The curvature pass runs over the training data (or the ``marglik_subset``) in order, with
    ``per_device_eval_batch_size`` and the Trainer's collator; ``N`` is counted once from the
    targets, without a model call.

    Checkpoints hold ``marglik_state.pt`` beside the Trainer's files;
    ``train(resume_from_checkpoint)`` reads it, so a resumed run equals an uninterrupted one.
    ``save_model`` writes ``marglik_hyperparameters.json`` beside the model. Data-parallel runs
    (accelerate, torchrun) count the data and sum the curvature over all processes, which then
    hold identical hyperparameters.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, MargLikTrainingArguments):
            raise TypeError(
                f"MargLikTrainer needs args=MargLikTrainingArguments(...), got "
                f"{type(self.args).__name__}."
            )
        if self.compute_loss_func is not None:
            raise ValueError(
                "compute_loss_func is not supported: MargLikTrainer computes the likelihood from "
                "the logits (set args.likelihood)."
            )
        if self.model_init is not None:
            raise ValueError("model_init is not supported by MargLikTrainer; pass a model.")
        if self.args.label_names is None:
            self.label_names = [self.args.dict_key_y]
        if not hasattr(Trainer, "loss_is_scaled_for_ga"):
            # older transformers divide the loss by the accumulation steps unless this is set
            self.model_accepts_loss_kwargs = True
        trainable_parameters(self.model)  # a clear error when nothing is trainable
        self.laplace: Laplace | None = None
        self.margliks: list[float] = []
        self.losses: list[float] = []
        self.marglik_update_steps: list[int] = []
        self.n_data: int | None = None
        self._hyper: HyperOptimizer | None = None
        self._final = False
        self.add_callback(_MargLikCallback(self))

    # ------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """``Trainer.train`` with the marginal-likelihood steps; at the end the best parameters
        are restored (``restore_best_marglik``) and the Laplace approximation is refit."""
        if resume_from_checkpoint is True:
            out = self.args.output_dir
            last = get_last_checkpoint(out) if out and os.path.isdir(out) else None
            if last is None:
                raise ValueError(f"No checkpoint in output_dir={out!r} to resume from.")
            resume_from_checkpoint = last
        elif resume_from_checkpoint is False:
            resume_from_checkpoint = None
        self._start(resume_from_checkpoint)
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        self._finish()
        return output

    def _start(self, checkpoint: str | None) -> None:
        a = self.args
        named = trainable_parameters(self.model)
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._hyper = HyperOptimizer(
            [p.numel() for p in self._params],
            a.likelihood,
            a.prior_structure,
            a.prior_prec_init,
            a.sigma_noise_init,
            a.temperature,
            a.fix_sigma_noise,
            a.lr_hyp,
            device=self._params[0].device,
            dtype=self._params[0].dtype,
        )
        # data-parallel: each process counts its shard of the training data, summed over all
        self.n_data = _sum_over_processes(
            count_data_points(
                self.get_test_dataloader(self.train_dataset),
                a.likelihood,
                a.dict_key_x,
                a.dict_key_y,
            )
        )
        self._fit_dataset = self._subset(self.train_dataset)
        self.laplace, self._final = None, False
        self.margliks, self.losses, self.marglik_update_steps = [], [], []
        self._best: dict | None = None
        self._best_marglik = math.inf
        self._epoch_loss, self._epoch_items = 0.0, 0
        self._check_schedule()
        if self.optimizer is not None and any(
            g.get("weight_decay", 0) > 0 for g in self.optimizer.param_groups
        ):
            warnings.warn(
                "The optimizer passed to MargLikTrainer has weight_decay > 0: it adds to the "
                "learned prior. Build it with weight_decay=0.",
                UserWarning,
                stacklevel=3,
            )
        if checkpoint is not None:
            self._load_state(checkpoint)

    def _subset(self, dataset):
        s = self.args.marglik_subset
        if s is None:
            return dataset
        n = len(dataset)
        k = max(1, math.ceil(s * n)) if s <= 1 else min(int(s), n)
        idx = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(self.args.seed))[:k])
        idx = [int(i) for i in idx]
        if hasattr(dataset, "select"):  # datasets.Dataset
            return dataset.select(idx)
        return torch.utils.data.Subset(dataset, idx)

    def _check_schedule(self) -> None:
        a = self.args
        try:
            per_epoch = math.ceil(len(self.get_train_dataloader()) / a.gradient_accumulation_steps)
        except TypeError:  # no length: nothing to check
            return
        total = a.max_steps if a.max_steps > 0 else math.ceil(a.num_train_epochs * per_epoch)
        if a.marglik_steps is not None:
            steps = range(a.marglik_steps, total + 1, a.marglik_steps)
            ok = any(s / per_epoch >= a.n_epochs_burnin for s in steps)
        else:
            epochs = range(1, total // per_epoch + 1)
            ok = any(e % a.marglik_frequency == 0 and e >= a.n_epochs_burnin for e in epochs)
        if not ok:
            warnings.warn(
                f"No marginal-likelihood step falls within training ({total} optimizer steps, "
                f"{per_epoch} per epoch) with n_epochs_burnin={a.n_epochs_burnin}, "
                f"marglik_frequency={a.marglik_frequency}, marglik_steps={a.marglik_steps}: the "
                "prior stays at prior_prec_init. Lower n_epochs_burnin or the frequency, or "
                "train longer.",
                UserWarning,
                stacklevel=4,
            )

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        """The Trainer's batches of one optimizer step, with ``num_items_in_batch`` counted by the
        likelihood's own rule (``dict_key_y``, -100 and padding excluded, shifted for causal LM),
        so that the loss normalisation always matches the data count of the likelihood."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        a = self.args
        n = sum(batch_targets(b, a.likelihood, a.dict_key_x, a.dict_key_y) for b in batches)
        return batches, _sum_over_processes(n)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """In training: ``(Σ ℓ + n_b·½θᵀPθ/(N·c)) / num_items_in_batch`` (see the module
        docstring); without ``num_items_in_batch`` the micro-batch's own count is used and the
        Trainer divides by the accumulation steps. In evaluation: ``Σ ℓ / n_b``, no prior."""
        a = self.args
        x, y = split_batch(inputs, a.dict_key_x, a.dict_key_y)
        logits = call_model(model, x, a.dict_key_x)
        mask = x.get("attention_mask") if isinstance(x, Mapping) else None
        t = targets_for(logits, y, a.likelihood, mask)
        scale = 2.0 if a.likelihood == Likelihood.REGRESSION else 1.0
        data_term = scale * nll_sum(t)
        if model.training:
            if self._hyper is None:
                self._start(None)
            total = data_term + self._hyper.prior_term(self._params) * (t.n_data / self.n_data)
            self._epoch_loss = self._epoch_loss + total.detach()  # no device sync per step
            self._epoch_items += t.n_data
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            denom = t.n_data if num_items_in_batch is None else num_items_in_batch
            loss = total / max(int(denom), 1)
            if num_items_in_batch is not None:
                # data-parallel: the count is global and DDP averages the gradients over the
                # processes, so each process's share is scaled back up (as Trainer.compute_loss)
                loss = loss * self.accelerator.num_processes
        else:
            loss = data_term / max(t.n_data, 1)
        return (loss, {"logits": logits}) if return_outputs else loss

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """``Trainer.evaluate``, plus for classification the accuracy, NLL, ECE (15 bins) and
        Brier score of the MAP model (``eval_accuracy`` …) and of the Laplace predictive
        (``eval_laplace_accuracy`` …, with ``pred_type`` / ``link_approx``) once a Laplace
        approximation exists (after the first marginal-likelihood update)."""
        metrics = super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        a = self.args
        if (
            not a.eval_laplace
            or a.likelihood != Likelihood.CLASSIFICATION
            or self.laplace is None
            or isinstance(dataset, dict)
        ):
            return metrics
        report = calibration_report(
            self.laplace,
            self.get_eval_dataloader(dataset),
            a.pred_type,
            a.link_approx,
            a.predictive_samples,
            torch.Generator().manual_seed(a.seed),
        )
        extra = {f"{metric_key_prefix}_{k}": v for k, v in report.items()}
        self.log(extra)
        metrics.update(extra)
        return metrics

    # ------------------------------------------------------------------ marginal likelihood
    def _on_step_end(self) -> None:
        a, state = self.args, self.state
        epoch_end = state.epoch is not None and state.epoch > 0
        epoch_end = epoch_end and abs(state.epoch - round(state.epoch)) < 1e-9
        if epoch_end:
            self.losses.append(float(self._epoch_loss) / max(self._epoch_items, 1))
            self._epoch_loss, self._epoch_items = 0.0, 0
        if a.marglik_steps is not None:
            due = state.global_step % a.marglik_steps == 0
        else:
            due = epoch_end and round(state.epoch) % a.marglik_frequency == 0
        if due and state.epoch >= a.n_epochs_burnin - 1e-9:
            self._marglik_update()

    def _new_laplace(self, prec, sigma, backprop: bool = False) -> Laplace:
        a = self.args
        return Laplace(
            self.model,
            a.likelihood,
            hessian_structure=a.hessian_structure,
            prior_precision=prec,
            sigma_noise=sigma,
            temperature=a.temperature,
            backend=a.backend,
            kfac_approx=a.kfac_approx,
            dict_key_x=a.dict_key_x,
            dict_key_y=a.dict_key_y,
            n_mc_samples=a.n_mc_samples,
            enable_backprop=backprop,
            factor_rank=a.factor_rank,
        )

    def _fit(self, lap: Laplace) -> Laplace:
        was_training = self.model.training
        subset = self.args.marglik_subset is not None
        loader = self.get_test_dataloader(self._fit_dataset)
        lap.fit(loader, n_data=self.n_data if subset else None)
        self.model.train(was_training)
        if not subset and lap.n_data != self.n_data:
            warnings.warn(
                f"The Laplace fit counted {lap.n_data} data points, the loss uses N={self.n_data}.",
                RuntimeWarning,
                stacklevel=2,
            )
        return lap

    def _marglik_update(self) -> None:
        hyper = self._hyper
        lap = self._fit(self._new_laplace(hyper.prior_precision, hyper.sigma_noise))
        values = hyper.step(lap, self.args.n_hypersteps)
        self.laplace = lap
        self.margliks.extend(values)
        self.marglik_update_steps.append(self.state.global_step)
        if not values:
            return
        if values[-1] < self._best_marglik:
            self._best_marglik = values[-1]
            self._best = {
                "params": [p.detach().clone() for p in self._params],
                "prior_precision": hyper.evaluated_prior_precision.clone(),
                "sigma_noise": hyper.evaluated_sigma_noise.clone(),
                "step": self.state.global_step,
            }
        self.log(self._hyper_logs(-values[-1]))

    def _hyper_logs(self, log_marglik: float) -> dict[str, float]:
        prec = self._hyper.prior_precision
        logs = {
            "marglik": log_marglik,
            "prior_prec_mean": float(prec.mean()),
            "prior_prec_min": float(prec.min()),
            "prior_prec_max": float(prec.max()),
        }
        structure = self.args.prior_structure
        if structure != PriorStructure.SCALAR:
            per_layer = self._per_layer(prec)
            logs.update({f"prior_prec/{n}": v for n, v in per_layer.items()})
        if self.args.likelihood == Likelihood.REGRESSION:
            logs["sigma_noise"] = float(self._hyper.sigma_noise)
        return logs

    def _per_layer(self, prec: torch.Tensor) -> dict[str, float]:
        """One value per trainable tensor (the mean for a diagonal prior), by short name."""
        if prec.numel() == 1:
            values = [float(prec)] * len(self._names)
        elif prec.numel() == len(self._names):
            values = prec.tolist()
        else:
            sizes = [p.numel() for p in self._params]
            values = [float(c.mean()) for c in torch.split(prec, sizes)]
        return {n.removeprefix("base_model.model."): v for n, v in zip(self._names, values)}

    def _finish(self) -> None:
        a, hyper = self.args, self._hyper
        prec, sigma = hyper.prior_precision, hyper.sigma_noise
        if a.restore_best_marglik and self._best is not None:
            with torch.no_grad():
                for p, b in zip(self._params, self._best["params"]):
                    p.copy_(b)
            prec, sigma = self._best["prior_precision"], self._best["sigma_noise"]
        self.laplace = self._fit(self._new_laplace(prec, sigma, backprop=a.enable_backprop))
        self._final = True

    @property
    def best_marglik(self) -> float | None:
        """The best log marginal likelihood seen during training (None before any update)."""
        return None if self._best is None else -self._best_marglik

    # ------------------------------------------------------------------ saving
    def _state_dict(self) -> dict:
        best = self._best
        if best is not None:
            best = {**best, "params": [p.detach().cpu() for p in best["params"]]}
        return {
            "version": 1,
            "param_names": list(self._names),
            "n_data": self.n_data,
            "hyper": self._hyper.state_dict(),
            "best": best,
            "best_marglik": self._best_marglik,
            "margliks": list(self.margliks),
            "losses": list(self.losses),
            "marglik_update_steps": list(self.marglik_update_steps),
            "epoch_loss": float(self._epoch_loss),
            "epoch_items": self._epoch_items,
        }

    def _on_save(self) -> None:
        if self._hyper is None or not self.args.should_save:
            return
        folder = os.path.join(
            self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        if not os.path.isdir(folder):
            warnings.warn(
                f"Checkpoint folder {folder} not found; marglik state not saved.", stacklevel=2
            )
            return
        _atomic(os.path.join(folder, STATE_NAME), torch.save, self._state_dict())

    def _load_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: {checkpoint} was not written by MargLikTrainer, so the "
                "hyperparameters cannot be resumed. Resume from a MargLikTrainer checkpoint or "
                "start without resume_from_checkpoint."
            )
        device = self._params[0].device
        sd = torch.load(path, map_location=device, weights_only=True)
        if sd["param_names"] != self._names:
            raise ValueError(f"{path} was saved for different trainable parameters.")
        self._hyper.load_state_dict(sd["hyper"])
        self._best, self._best_marglik = sd["best"], sd["best_marglik"]
        self.margliks, self.losses = list(sd["margliks"]), list(sd["losses"])
        self.marglik_update_steps = list(sd["marglik_update_steps"])
        self._epoch_loss, self._epoch_items = sd["epoch_loss"], sd["epoch_items"]

    def hyperparameters(self) -> dict:
        """The hyperparameters as plain JSON data: final ones after :meth:`train`, else current."""
        hyper, a = self._hyper, self.args
        if hyper is None:
            raise RuntimeError("No hyperparameters yet: call train() first.")
        if self._final and self.laplace is not None:
            prec, sigma = self.laplace.prior_precision, self.laplace.sigma_noise
        else:
            prec, sigma = hyper.prior_precision, hyper.sigma_noise
        prec = prec.detach().cpu().double()
        out = {
            "likelihood": a.likelihood.value,
            "prior_structure": a.prior_structure.value,
            "hessian_structure": a.hessian_structure.value,
            "backend": a.backend.value,
            "temperature": a.temperature,
            "sigma_noise": float(sigma),
            "n_data": self.n_data,
            "log_marglik": self.best_marglik,
            "param_names": list(self._names),
            "prior_precision_per_tensor": self._per_layer(prec),
        }
        if prec.numel() <= 100_000:
            out["prior_precision"] = prec.tolist()
        return out

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` and ``marglik_hyperparameters.json`` beside it (and, for a
        diagonal prior over more than 100k parameters, ``marglik_prior_precision.pt``)."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if self._hyper is None or not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        data = self.hyperparameters()
        if "prior_precision" not in data:
            prec = self._hyper.prior_precision.cpu()
            if self._final and self.laplace is not None:
                prec = self.laplace.prior_precision.detach().cpu()
            _atomic(os.path.join(output_dir, "marglik_prior_precision.pt"), torch.save, prec)
        _atomic(os.path.join(output_dir, HYPERPARAMETERS_NAME), _write_json, data)


def _write_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _sum_over_processes(n: int) -> int:
    """``n`` summed over the processes of a ``torch.distributed`` group (``n`` alone otherwise)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    t = torch.tensor(float(n), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return int(t.item())


def _atomic(path: str, write, obj) -> None:
    """Write ``obj`` with ``write(obj, tmp)`` and move it into place: never a partial file."""
    write(obj, path + ".tmp")
    os.replace(path + ".tmp", path)
