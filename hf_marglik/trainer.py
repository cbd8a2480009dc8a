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
import re
import warnings
from collections.abc import Mapping

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .batches import call_model, nll_sum, split_batch, targets_for
from .evaluation import calibration_report
from .hyper import HyperOptimizer, batch_targets, count_data_points
from .laplace import MAX_DENSE_BLOCK, Laplace
from .options import HessianStructure, Likelihood, PriorStructure, SubsetSampling
from .parallel import check_parallelism
from .params import trainable_parameters
from .preemption import SigtermCheckpointCallback
from .subset import CurvatureSubset, select_examples, subset_size
from .training_args import MargLikTrainingArguments

STATE_NAME = "marglik_state.pt"
"""Extra training state in each checkpoint folder (hyper-optimizer, best model, histories)."""
MAX_FULL_PARAMS = 20_000
"""``hessian_structure='full'`` is refused above this many trainable parameters (a dense
``n × n`` curvature: 3.2 GB in float64 at the limit)."""
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
    - ``marglik_skipped_steps``: the steps whose update was skipped (a curvature fit or log
      marginal likelihood with NaN / Inf, a step to a precision of 0 or Inf; with a warning);
    - ``n_data``: the data points the likelihood counts (sequences, or target tokens).

    Logged after every update (through ``log``, so every ``report_to`` target gets them):
    ``marglik`` (the log marginal likelihood), ``prior_prec_mean/min/max``,
    ``prior_prec/<tensor>`` (layerwise: the value; diag: the tensor's mean), ``sigma_noise``
    (regression) and ``marglik_n_clipped`` (negative K-FAC eigenvalues from rounding, clipped
    to 0); ``marglik_skipped`` after a skipped update. ``eval_loss`` is the held-out likelihood
    term per data point, without the prior.

    The curvature pass runs over the training data (or the ``marglik_subset``) in order, with
    ``per_device_eval_batch_size`` and the Trainer's collator; ``N`` is counted once from the
    targets, without a model call.

    Checkpoints hold ``marglik_state.pt`` beside the Trainer's files;
    ``train(resume_from_checkpoint)`` reads it, so a resumed run equals an uninterrupted one;
    ``True`` picks the last complete checkpoint. SIGTERM saves a checkpoint and stops
    (``save_on_sigterm``, :mod:`hf_marglik.preemption`).
    ``save_model`` writes ``marglik_hyperparameters.json`` beside the model. Data-parallel runs
    (accelerate, torchrun) count the data and sum the curvature over all processes, which then
    hold identical hyperparameters.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        check_parallelism(kwargs.get("args", args[1] if len(args) > 1 else None))
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
        named = trainable_parameters(self.model)  # a clear error when nothing is trainable
        self._names, self._params = [n for n, _ in named], [p for _, p in named]
        self._check_inputs()  # before any work, so that scripts report them as bad input
        self.laplace: Laplace | None = None
        self.margliks: list[float] = []
        self.losses: list[float] = []
        self.marglik_update_steps: list[int] = []
        self.marglik_skipped_steps: list[int] = []
        self.n_data: int | None = None
        self._hyper: HyperOptimizer | None = None
        self._final = False
        self.add_callback(_MargLikCallback(self))
        # after the marglik callback: a SIGTERM checkpoint holds that step's update
        self.sigterm_callback = SigtermCheckpointCallback() if self.args.save_on_sigterm else None
        if self.sigterm_callback is not None:
            self.add_callback(self.sigterm_callback)

    # ------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """``Trainer.train`` with the marginal-likelihood steps; at the end the best parameters
        are restored (``restore_best_marglik``) with the Laplace approximation fitted at them.

        ``resume_from_checkpoint=True`` resumes from the last *complete* checkpoint in
        ``output_dir``: one that holds ``marglik_state.pt``, the file written last (atomically)
        into a checkpoint. A folder a kill left half-written is skipped with a warning.

        With ``save_on_sigterm`` (default), SIGTERM during the training loop writes a checkpoint
        at the next step boundary and ends training early (:mod:`hf_marglik.preemption`): then
        ``sigterm_callback.stopped_at`` is that step and the end-of-training work (best-model
        restore, final Laplace fit) is not done; resume from the checkpoint to finish.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        elif resume_from_checkpoint is False:
            resume_from_checkpoint = None
        self._start(resume_from_checkpoint)
        stop = self.sigterm_callback
        if stop is not None:
            stop.install()
        try:
            output = super().train(
                resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs
            )
        finally:
            if stop is not None:
                stop.restore()
        if stop is not None and stop.stopped_at is not None:
            return output  # preempted: the checkpoint is written, finish after resuming
        self._finish()
        return output

    def _start(self, checkpoint: str | None) -> None:
        a = self.args
        named = trainable_parameters(self.model)
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        if self.train_dataset is None:
            raise ValueError("MargLikTrainer.train() needs a train_dataset.")
        self._check_inputs()
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
                self._data_pass_loader(self.train_dataset),
                a.likelihood,
                a.dict_key_x,
                a.dict_key_y,
            )
        )
        self._curvature_subset = None
        if a.marglik_subset is not None and a.marglik_subset_sampling == SubsetSampling.CURVATURE:
            self._curvature_subset = CurvatureSubset(
                self.train_dataset, a.marglik_subset, a.dict_key_x, a.seed
            )
        self._fit_dataset = self._subset(self.train_dataset)
        self.laplace, self._final = None, False
        self.margliks, self.losses, self.marglik_update_steps = [], [], []
        self.marglik_skipped_steps: list[int] = []
        self._best: dict | None = None
        self._best_marglik = math.inf
        self._fitted_at: dict[int, Laplace] = {}  # global step -> fit (last and best only)
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

    def _check_inputs(self) -> None:
        """Input errors that would otherwise surface mid-training (or exhaust memory), raised
        at construction and again when training starts."""
        a = self.args
        try:
            empty = self.train_dataset is not None and len(self.train_dataset) == 0
        except TypeError:  # no length (an iterable dataset)
            empty = False
        if empty:
            raise ValueError("The training dataset is empty (0 examples): pass a train_dataset.")
        n_params = sum(p.numel() for p in self._params)
        if a.hessian_structure == HessianStructure.FULL and n_params > MAX_FULL_PARAMS:
            gb = n_params**2 * self._params[0].element_size() / 1e9
            raise ValueError(
                f"hessian_structure='full' stores a dense {n_params:,} x {n_params:,} matrix "
                f"({gb:,.1f} GB) for the {n_params:,} trainable parameters (limit "
                f"{MAX_FULL_PARAMS:,}). Use hessian_structure='kron' or 'diag'."
            )
        if (
            a.prior_structure == PriorStructure.DIAG
            and a.hessian_structure == HessianStructure.KRON
        ):
            big = [(n, p.numel()) for n, p in zip(self._names, self._params)]
            big = [(n, k) for n, k in big if k > MAX_DENSE_BLOCK]
            if big:
                raise ValueError(
                    f"prior_structure='diag' with hessian_structure='kron' factorises each "
                    f"tensor's block densely, and {big[0][0]} has {big[0][1]} parameters (limit "
                    f"{MAX_DENSE_BLOCK}). Use prior_structure='layerwise' or 'scalar', or "
                    "hessian_structure='diag' with a diagonal prior."
                )

    def _subset(self, dataset):
        s = self.args.marglik_subset
        if s is None or self._curvature_subset is not None:
            return dataset
        k = subset_size(s, len(dataset))
        n = len(dataset)
        idx = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(self.args.seed))[:k])
        return select_examples(dataset, [int(i) for i in idx])

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
            if self._curvature_subset is not None:
                ids = x[a.dict_key_x] if isinstance(x, Mapping) else x
                self._curvature_subset.record(ids, mask, logits, self.state.global_step)
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

    def _data_pass_loader(self, dataset):
        """``get_test_dataloader`` without accelerate's even-batches padding, which in a
        data-parallel run fills the last batches with repeated examples: each example of a
        curvature pass or data count is seen exactly once over the processes."""
        acc = self.accelerator
        even = acc.even_batches
        acc.even_batches = False
        try:
            return self.get_test_dataloader(dataset)
        finally:
            acc.even_batches = even

    def _fit(self, lap: Laplace) -> Laplace:
        was_training = self.model.training
        subset = self.args.marglik_subset is not None
        dataset, weights = self._fit_dataset, None
        if self._curvature_subset is not None:
            dataset, weights = self._curvature_subset.draw_subset(self.state.global_step)
        loader = self._data_pass_loader(dataset)
        lap.fit(loader, n_data=self.n_data if subset else None, example_weights=weights)
        self.model.train(was_training)
        if not subset and lap.n_data != self.n_data:
            warnings.warn(
                f"The Laplace fit counted {lap.n_data} data points, the loss uses N={self.n_data}.",
                RuntimeWarning,
                stacklevel=2,
            )
        return lap

    def _marglik_update(self) -> None:
        """Fit the curvature and step the hyperparameters. A fit with NaN or Inf (a diverged
        model, a float16 overflow), or an update whose first hyper-step the hyper-optimizer
        rejects, is skipped with a ``RuntimeWarning``: the hyperparameters, ``laplace`` and the
        best model stay as they were, the step goes to ``marglik_skipped_steps`` and
        ``marglik_skipped`` is logged."""
        hyper = self._hyper
        lap, fault = self._checked_fit(self._new_laplace(hyper.prior_precision, hyper.sigma_noise))
        if fault is not None:
            warnings.warn(
                f"Skipping the hyperparameter update at step {self.state.global_step}: the "
                f"curvature fit is not finite ({fault}); a diverged model or a float16 "
                "overflow? The prior precision and noise keep their previous values and "
                "training goes on.",
                RuntimeWarning,
                stacklevel=2,
            )
            values = []
        else:
            values = hyper.step(lap, self.args.n_hypersteps)  # warns itself when it skips
        if not values:
            self.marglik_skipped_steps.append(self.state.global_step)
            self.log({"marglik_skipped": 1.0})
            return
        self.laplace = lap
        self.margliks.extend(values)
        self.marglik_update_steps.append(self.state.global_step)
        if values[-1] < self._best_marglik:
            self._best_marglik = values[-1]
            self._best = {
                "params": [p.detach().clone() for p in self._params],
                "prior_precision": hyper.evaluated_prior_precision.clone(),
                "sigma_noise": hyper.evaluated_sigma_noise.clone(),
                "step": self.state.global_step,
            }
        self._keep_fit(lap)
        self.log(self._hyper_logs(-values[-1], lap.n_clipped))

    def _keep_fit(self, lap: Laplace) -> None:
        """Keep this update's fit and the best update's (for reuse at the end), drop others."""
        step = self.state.global_step
        keep = {step} | ({self._best["step"]} if self._best is not None else set())
        self._fitted_at = {s: f for s, f in {**self._fitted_at, step: lap}.items() if s in keep}

    def _checked_fit(self, lap: Laplace) -> tuple[Laplace, str | None]:
        """Fit ``lap``; return it and ``None``, or a description of what is not finite. The
        check is the log marginal likelihood at the current hyperparameters: finite exactly
        when the fit's loss and every curvature eigenvalue are finite."""
        failed = None
        try:
            self._fit(lap)
        except torch.linalg.LinAlgError as err:  # eigh of a matrix with Inf, or NaN on GPU
            failed = err
        if lap.loss is not None and not torch.isfinite(lap.loss):
            return lap, f"the training loss over the fit's data is {float(lap.loss)}"
        try:
            if failed is not None:
                raise failed
            value = lap.log_marginal_likelihood()
        except torch.linalg.LinAlgError as err:
            return lap, f"its decomposition failed: {err}"
        if not torch.isfinite(value):
            return lap, f"the curvature holds NaN or Inf; log marginal likelihood {float(value)}"
        return lap, None

    def _hyper_logs(self, log_marglik: float, n_clipped: int = 0) -> dict[str, float]:
        prec = self._hyper.prior_precision
        logs = {
            "marglik": log_marglik,
            "marglik_n_clipped": n_clipped,
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
            step = self._best["step"]
        else:
            step = self.state.global_step
        # a fit made at exactly the final parameters (the best update's, or the last update's
        # when training ended with it) is reused with the final hyperparameters; otherwise (a
        # resumed run whose best came before the checkpoint, steps after the last update) refit
        lap = self._fitted_at.get(step)
        self._final_hyper = (prec, sigma)
        if lap is None or a.enable_backprop:
            new = self._new_laplace(prec, sigma, backprop=a.enable_backprop)
            lap, fault = self._checked_fit(new)
            if fault is not None:
                warnings.warn(
                    f"The final Laplace approximation is not finite ({fault}): trainer.laplace "
                    "is None; the learned hyperparameters are kept.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                lap = None
        else:
            lap.prior_precision = prec
            if a.likelihood == Likelihood.REGRESSION:
                lap.sigma_noise = sigma
        self.laplace, self._fitted_at = lap, {}
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
            "marglik_skipped_steps": list(self.marglik_skipped_steps),
            "epoch_loss": float(self._epoch_loss),
            "epoch_items": self._epoch_items,
            "subset_scores": (
                None if self._curvature_subset is None else self._curvature_subset.state_dict()
            ),
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
        self.marglik_skipped_steps = list(sd.get("marglik_skipped_steps", []))
        self._epoch_loss, self._epoch_items = sd["epoch_loss"], sd["epoch_items"]
        if self._curvature_subset is not None and sd.get("subset_scores") is not None:
            self._curvature_subset.load_state_dict(sd["subset_scores"])

    def hyperparameters(self) -> dict:
        """The hyperparameters as plain JSON data: final ones after :meth:`train`, else current."""
        hyper, a = self._hyper, self.args
        if hyper is None:
            raise RuntimeError("No hyperparameters yet: call train() first.")
        if self._final:
            prec, sigma = self._final_hyper
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
            if self._final:
                prec = self._final_hyper[0].detach().cpu()
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


def last_complete_checkpoint(output_dir: str | None) -> str:
    """The ``checkpoint-<step>`` folder of ``output_dir`` with the highest step that holds
    ``marglik_state.pt`` (written last into a checkpoint, so its presence means the Trainer's
    files before it are complete); later folders without it are skipped with a warning."""
    if not output_dir or not os.path.isdir(output_dir):
        raise ValueError(f"No checkpoint in output_dir={output_dir!r} to resume from.")
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    steps = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(output_dir)
        if (m := pattern.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    incomplete = []
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        if os.path.isfile(os.path.join(folder, STATE_NAME)):
            if incomplete:
                warnings.warn(
                    f"Skipping incomplete checkpoint(s) {', '.join(incomplete)} (no "
                    f"{STATE_NAME}: the run was killed while saving?); resuming from {folder}.",
                    UserWarning,
                    stacklevel=3,
                )
            return folder
        incomplete.append(name)
    if incomplete:
        raise ValueError(
            f"No complete MargLikTrainer checkpoint in output_dir={output_dir!r}: "
            f"{', '.join(reversed(incomplete))} lack {STATE_NAME}. Start without "
            "resume_from_checkpoint."
        )
    raise ValueError(f"No checkpoint in output_dir={output_dir!r} to resume from.")


def _atomic(path: str, write, obj) -> None:
    """Write ``obj`` with ``write(obj, tmp)`` and move it into place: never a partial file."""
    write(obj, path + ".tmp")
    os.replace(path + ".tmp", path)
