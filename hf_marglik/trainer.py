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
likelihood (:class:`~hf_marglik.loop.MargLikLoop`). The update runs in ``on_step_end``, before
the Trainer logs and saves, so a checkpoint always holds the hyperparameters that the next step
trains with.

:class:`MargLikTrainerMixin` holds all of it for any ``Trainer`` subclass (TRL's ``SFTTrainer``
in :mod:`hf_marglik.sft`); it overrides public Trainer hooks only (``train``, ``compute_loss``,
``get_batch_samples``, ``evaluate``, ``save_model``, ``call_model_init``,
``hyperparameter_search``) and adds two callbacks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Mapping

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .batches import call_model, nll_sum, split_batch, targets_for
from .checkpoint import (
    HYPERPARAMETERS_NAME,
    PRIOR_PRECISION_NAME,
    STATE_NAME,
    checkpoint_folder,
    last_complete_checkpoint,
    save_json,
    save_torch,
)
from .draws import derive_seed
from .evaluation import calibration_report
from .hyper import HyperOptimizer, batch_targets, count_data_points, likelihood_scale
from .laplace import MAX_DENSE_BLOCK, Laplace
from .loop import MargLikLoop
from .lora import freeze_lora_a, lora_groups
from .memory import check_memory
from .online import DEFAULT_BUDGET, OnlineCurvature, interval_for_budget
from .options import (
    CurvatureSource,
    HessianStructure,
    Likelihood,
    PredictivePrior,
    PriorApplication,
    PriorMean,
    PriorStructure,
    SubsetSampling,
)
from .parallel import check_parallelism, sum_over_processes
from .preemption import SigtermCheckpointCallback
from .prior import trainable_parameters
from .quantization import keep_4bit_differentiable
from .subset import CurvatureSubset, select_examples, subset_size
from .tensor_files import save_tensors
from .training_args import MargLikArguments
from .tuning import tune_predictive_prior

logger = logging.getLogger(__name__)

__all__ = ["MargLikTrainer", "MargLikTrainerMixin", "HYPERPARAMETERS_NAME", "STATE_NAME"]

MAX_FULL_PARAMS = 20_000
"""``hessian_structure='full'`` is refused above this many trainable parameters (a dense
``n × n`` curvature: 3.2 GB in float64 at the limit)."""
PER_TENSOR_PREFIX = "prior_prec/"
"""Logged per-tensor precisions: sent to ``report_to`` targets, left out of the console."""
STATE_VERSION = 2


class _MargLikCallback(TrainerCallback):
    """Runs the trainer's marginal-likelihood step after optimizer steps and writes its state
    into each checkpoint."""

    def __init__(self, trainer: MargLikTrainerMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._on_train_begin()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._apply_decoupled_prior()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._on_step_end()

    def on_save(self, args, state, control, **kwargs):
        self.trainer._on_save()


def _compact_console(cls: type[TrainerCallback]) -> type[TrainerCallback]:
    """``cls`` (a console printer) without the per-tensor precisions in its lines."""

    class Compact(cls):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                logs = {k: v for k, v in logs.items() if not k.startswith(PER_TENSOR_PREFIX)}
            return super().on_log(args, state, control, logs=logs, **kwargs)

    Compact.__name__ = Compact.__qualname__ = f"Compact{cls.__name__}"
    return Compact


def _console_printers() -> tuple[type, ...]:
    printers: tuple[type, ...] = (ProgressCallback, PrinterCallback)
    try:
        from transformers.utils.notebook import NotebookProgressCallback
    except ImportError:  # no IPython
        return printers
    return (*printers, NotebookProgressCallback)


class MargLikTrainerMixin:
    """Marginal-likelihood training for a ``transformers.Trainer`` subclass: put it first in the
    bases (``class X(MargLikTrainerMixin, SomeTrainer)``) and pass ``args`` that subclass
    :class:`~hf_marglik.training_args.MargLikArguments`.

    After :meth:`train`:

    - ``laplace``: the :class:`~hf_marglik.Laplace` approximation at the final (by default the
      best-marglik) parameters and hyperparameters (when its fit is not finite, with a
      warning, one without a posterior: ``laplace.fit_error`` says why, its posterior methods
      raise; the hyperparameters and the model are kept);
    - ``margliks``: negative log marginal likelihoods, one per hyper-step (as laplace-torch);
    - ``losses``: the mean training loss (log joint per data point) of each completed epoch;
    - ``marglik_update_steps``: the global steps after which the hyperparameters were updated;
    - ``marglik_skipped_steps``: the steps whose update was skipped (a curvature fit or log
      marginal likelihood with NaN / Inf, a step to a precision of 0 or Inf; with a warning);
    - ``log_marglik``, ``log_marglik_per_datum``: the evidence of ``laplace`` (total, and per
      data point);
    - ``n_data``: the data points the likelihood counts (sequences, or target tokens);
    - ``marglik_loop``: the :class:`~hf_marglik.loop.MargLikLoop` (hyper-optimiser, best
      update, histories).

    Logged after every update (through ``log``, so every ``report_to`` target gets them):
    ``marglik`` (the log marginal likelihood), ``prior_prec_mean/min/max``,
    ``prior_prec/<tensor>`` (layerwise: the value; diag: the tensor's mean; not printed to the
    console), ``sigma_noise`` (regression) and ``marglik_n_clipped`` (negative K-FAC
    eigenvalues from rounding, clipped to 0); ``marglik_skipped`` after a skipped update.
    ``eval_loss`` is the held-out likelihood term per data point, without the prior;
    ``evaluate()`` adds ``eval_map_*`` and ``eval_laplace_*`` (see :meth:`evaluate`).

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

    With ``model_init`` instead of ``model``, every ``train()`` trains the model the Trainer
    builds for it, with a fresh marginal-likelihood state; :meth:`hyperparameter_search` chooses
    among such runs by their evidence.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        check_parallelism(kwargs.get("args", args[1] if len(args) > 1 else None))
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, MargLikArguments):
            raise TypeError(
                f"{type(self).__name__} needs args=MargLikTrainingArguments(...) (or "
                f"MargLikSFTConfig for the SFT trainer), got {type(self.args).__name__}."
            )
        if self.compute_loss_func is not None:
            raise ValueError(
                "compute_loss_func is not supported: the marginal-likelihood trainer computes "
                "the likelihood from the logits (set args.likelihood)."
            )
        if self.args.predictive_prior == PredictivePrior.GRIDSEARCH and self.eval_dataset is None:
            raise ValueError(
                "predictive_prior='gridsearch' tunes the predictive's prior on eval_dataset after "
                "training: pass an eval_dataset (a validation split), or set "
                "predictive_prior='marglik'."
            )
        if self.args.label_names is None:
            self.label_names = [self.args.dict_key_y]
        if not hasattr(Trainer, "loss_is_scaled_for_ga"):
            # older transformers divide the loss by the accumulation steps unless this is set
            self.model_accepts_loss_kwargs = True
        keep_4bit_differentiable(self.model)  # a k-bit base: no bf16 repacking on CPU
        if self.model_init is None:  # call_model_init prepared a model_init's model
            self._freeze(self.model)
        named = trainable_parameters(self.model)  # a clear error when nothing is trainable
        self._names, self._params = [n for n, _ in named], [p for _, p in named]
        self._check_inputs()  # before any work, so that scripts report them as bad input
        self.marglik_loop: MargLikLoop | None = None
        self.n_data: int | None = None
        self._curvature_subset = None
        self._online: OnlineCurvature | None = None
        self._deferred_start: tuple[str | None] | None = None
        self._search_trial = None
        self.add_callback(_MargLikCallback(self))
        # after the marglik callback: a SIGTERM checkpoint holds that step's update
        self.sigterm_callback = SigtermCheckpointCallback() if self.args.save_on_sigterm else None
        if self.sigterm_callback is not None:
            self.add_callback(self.sigterm_callback)
        for cb in list(self.callback_handler.callbacks):
            if type(cb) in _console_printers():
                self.remove_callback(cb)
                self.add_callback(_compact_console(type(cb)))

    # ------------------------------------------------------------------ results
    @property
    def laplace(self) -> Laplace | None:
        return None if self.marglik_loop is None else self.marglik_loop.laplace

    @property
    def margliks(self) -> list[float]:
        return [] if self.marglik_loop is None else self.marglik_loop.margliks

    @property
    def losses(self) -> list[float]:
        return [] if self.marglik_loop is None else self.marglik_loop.losses

    @property
    def marglik_update_steps(self) -> list[int]:
        return [] if self.marglik_loop is None else self.marglik_loop.update_steps

    @property
    def marglik_skipped_steps(self) -> list[int]:
        return [] if self.marglik_loop is None else self.marglik_loop.skipped_steps

    @property
    def best_marglik(self) -> float | None:
        """The best log marginal likelihood seen during training (None before any update)."""
        return None if self.marglik_loop is None else self.marglik_loop.best_marglik

    @property
    def log_marglik(self) -> float | None:
        """``log p(D | M)``: the Laplace log marginal likelihood of ``laplace`` (after
        :meth:`train`, the posterior of the model the trainer keeps, at the kept
        hyperparameters). None without a posterior."""
        if self.laplace is None:
            return None
        with torch.no_grad():
            return float(self.laplace.log_marginal_likelihood())

    @property
    def log_marglik_per_datum(self) -> float | None:
        """:attr:`log_marglik` divided by ``n_data``: the evidence that
        :meth:`hyperparameter_search` maximises by default. None without a posterior."""
        total = self.log_marglik
        return None if total is None or not self.n_data else total / self.n_data

    # ------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """``Trainer.train`` with the marginal-likelihood steps. At the end the trainer keeps
        the parameters of the best marginal likelihood (``restore_best_marglik``), or the model
        ``load_best_model_at_end`` loads, or the last one, and fits ``laplace`` there (reusing a
        fit made at exactly those parameters); one info line says which model is kept.

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
        self._search_trial = trial
        if self.model_init is None:
            self._start(resume_from_checkpoint)
        else:
            # Trainer.train builds this run's model (model_init(trial)) and sets the trial's
            # arguments: the marginal-likelihood state starts on that model, at on_train_begin.
            # Nothing of the previous run's model is kept meanwhile.
            self._drop_state()
            self._deferred_start = (resume_from_checkpoint,)
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
        if (
            trial is not None
            and getattr(self, "compute_objective", None) == self.evidence_objective
        ):
            # the search's objective is the kept model's evidence, not a value an evaluation
            # during training reported for an earlier model (Trainer.hyperparameter_search
            # reads `objective` after train())
            self.objective = self.evidence_objective({})
        return output

    def _on_train_begin(self) -> None:
        if self._deferred_start is not None:
            (checkpoint,) = self._deferred_start
            self._deferred_start = None
            self._start(checkpoint)

    def _drop_state(self) -> None:
        """Forget the marginal-likelihood state of an earlier run (and with it that run's
        model, which the posterior and the parameter lists hold)."""
        self.marglik_loop = None
        self._names, self._params = [], []
        self._online = self._curvature_subset = self._fit_dataset = None

    def _freeze(self, model) -> None:
        if getattr(self.args, "freeze_lora_a", False):
            frozen = freeze_lora_a(model)
            logger.info(
                "freeze_lora_a: %d LoRA A factors frozen at their initialisation; LoRA B and the "
                "other trainable tensors train.",
                len(frozen),
            )

    def call_model_init(self, trial=None):
        """``Trainer.call_model_init`` (``model_init()`` or ``model_init(trial)``), with the LoRA
        A factors frozen when ``freeze_lora_a`` is set."""
        model = super().call_model_init(trial)
        keep_4bit_differentiable(model)
        self._freeze(model)
        return model

    # ------------------------------------------------------------------ model selection
    def hyperparameter_search(
        self,
        hp_space=None,
        compute_objective=None,
        n_trials: int = 20,
        direction: str | list[str] | None = None,
        backend: str | None = "optuna",
        hp_name=None,
        **kwargs,
    ):
        """``Trainer.hyperparameter_search`` (optuna backend; needs ``pip install
        hf_marglik[search]`` and a trainer built with ``model_init``), choosing models by their
        evidence: without ``compute_objective`` each trial's objective is
        :attr:`log_marglik_per_datum` of the model that trial's ``train()`` keeps (no
        ``eval_dataset`` needed), ``direction`` defaults to ``"maximize"`` and no trial is pruned
        (optuna's ``NopPruner``, unless ``pruner=`` is passed: values reported during training
        are earlier posteriors' evidence). With a ``compute_objective`` it is the Trainer's
        search on the metrics of ``evaluate()`` (``direction`` default ``"minimize"``).

        ``model_init(trial)`` builds each trial's model (e.g. a LoRA rank from
        ``trial.suggest_categorical``; ``trial`` is None when the trainer is constructed);
        ``hp_space(trial)`` returns the training arguments a trial sets. Returns the Trainer's
        ``BestRun``; the trainer holds the last trial afterwards, not the best."""
        if backend in (None, "optuna"):
            from .search import require_optuna

            optuna = require_optuna()
            backend = "optuna"
            if compute_objective is None:
                kwargs.setdefault("pruner", optuna.pruners.NopPruner())
        if compute_objective is None:
            compute_objective = self.evidence_objective
            direction = "maximize" if direction is None else direction
        elif direction is None:
            direction = "minimize"
        return super().hyperparameter_search(
            hp_space=hp_space,
            compute_objective=compute_objective,
            n_trials=n_trials,
            direction=direction,
            backend=backend,
            hp_name=hp_name,
            **kwargs,
        )

    def evidence_objective(self, metrics: dict[str, float] | None = None) -> float:
        """The default objective of :meth:`hyperparameter_search`: :attr:`log_marglik_per_datum`
        (``metrics`` are not read); NaN before the first posterior exists."""
        value = self.log_marglik_per_datum
        return math.nan if value is None else value

    def _start(self, checkpoint: str | None) -> None:
        a = self.args
        named = trainable_parameters(self.model)
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        if self.train_dataset is None:
            raise ValueError(f"{type(self).__name__}.train() needs a train_dataset.")
        self._check_inputs()
        self.memory_plan = check_memory(self.model, a, self.eval_dataset)  # logs; refuses
        hyper = HyperOptimizer(
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
            tie_groups=lora_groups(self._names) if a.tie_lora_prior else None,
            max_log_step=a.max_log_prior_step,
        )
        if a.prior_mean == PriorMean.INIT:
            hyper.centre_prior_at(self._params)  # a resumed run loads the saved centre instead
        self.marglik_loop = MargLikLoop(
            self._params,
            hyper,
            a.n_hypersteps,
            restore_best=a.restore_best_marglik,
            new_laplace=self._new_laplace,
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
        self._online = None
        if a.marglik_curvature == CurvatureSource.ONLINE:
            every = interval_for_budget(
                DEFAULT_BUDGET if a.marglik_budget is None else a.marglik_budget
            )
            self._online = OnlineCurvature.for_laplace(
                self._new_laplace(hyper.prior_precision, hyper.sigma_noise),
                every,
                seed=a.seed,  # keyed with the step and each example: any process count
            )
        self._epoch_loss, self._epoch_items = 0.0, 0
        self._saved_epoch = (0.0, 0)
        self._check_schedule()
        decays = self.optimizer is not None and any(
            g.get("weight_decay", 0) > 0 for g in self.optimizer.param_groups
        )
        explicit = getattr(a, "_prior_application_set", True)
        if decays and explicit and a.prior_application == PriorApplication.DECOUPLED:
            raise ValueError(
                "prior_application='decoupled' decays the parameters by the learned prior, and "
                "the optimizer passed to the trainer has weight_decay > 0, which would decay "
                "them a second time. Build it with weight_decay=0."
            )
        if decays:
            warnings.warn(
                "The optimizer passed to the marginal-likelihood trainer has weight_decay > 0: it "
                "adds to the learned prior. Build it with weight_decay=0.",
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
        if a.tie_lora_prior:
            lora_groups(self._names)  # a clear error for a model without LoRA factors
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
        if model.training and self.marglik_loop is None:
            self._start(None)
        x, y = split_batch(inputs, a.dict_key_x, a.dict_key_y)
        mask = x.get("attention_mask") if isinstance(x, Mapping) else None
        online = self._online if model.training and self._collecting() else None
        with online.recording(model) if online is not None else contextlib.nullcontext() as rec:
            logits = call_model(model, x, a.dict_key_x)
            t = targets_for(logits, y, a.likelihood, mask)
            if online is not None:  # one extra backward of sampled labels on this graph
                ids = x[a.dict_key_x] if isinstance(x, Mapping) else x
                online.add(rec, t, mask, ids, self.state.global_step)
        data_term = likelihood_scale(a.likelihood) * nll_sum(t)
        if model.training:
            if self._curvature_subset is not None:
                ids = x[a.dict_key_x] if isinstance(x, Mapping) else x
                self._curvature_subset.record(ids, mask, logits, self.state.global_step)
            decoupled = a.prior_application == PriorApplication.DECOUPLED
            with torch.no_grad() if decoupled else contextlib.nullcontext():  # logged only
                prior = self.marglik_loop.hyper.prior_term(self._params) * (t.n_data / self.n_data)
            if decoupled:
                # the prior acts at the optimizer step (_apply_decoupled_prior), not through the
                # gradient; the recorded epoch loss is still the log joint
                total = data_term
                self._epoch_loss = self._epoch_loss + prior.detach()
            else:
                total = data_term + prior
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
        """``Trainer.evaluate``, plus for classification, once a Laplace approximation exists
        (after the first marginal-likelihood update) and with ``eval_laplace``: accuracy, NLL,
        ECE (15 bins) and Brier score of the MAP model (``eval_map_accuracy``, ``eval_map_nll``,
        ``eval_map_ece``, ``eval_map_brier``) and of the Laplace predictive
        (``eval_laplace_accuracy`` …, with ``pred_type`` / ``link_approx``). Keys the user's
        ``compute_metrics`` returned are never overwritten: a clashing key of ours is left out,
        with a warning."""
        metrics = super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        a = self.args
        if (
            not a.eval_laplace
            or a.likelihood != Likelihood.CLASSIFICATION
            or self.laplace is None
            or self.laplace.fit_error is not None  # no posterior: the final fit was not finite
            or isinstance(dataset, dict)
        ):
            return metrics
        report = calibration_report(
            self.laplace,
            self.get_eval_dataloader(dataset),
            a.pred_type,
            a.link_approx,
            a.predictive_samples,
            torch.Generator(self.laplace.device).manual_seed(a.seed),  # draws on that device
            gather=self.accelerator.gather_for_metrics,  # each process evaluates a shard
        )
        extra = {}
        for key, value in report.items():
            name = f"{metric_key_prefix}_{key if key.startswith('laplace_') else 'map_' + key}"
            if name in metrics:
                warnings.warn(
                    f"evaluate(): {name!r} is already in the metrics (compute_metrics?); the "
                    "marginal-likelihood trainer's value is left out.",
                    UserWarning,
                    stacklevel=2,
                )
                continue
            extra[name] = value
        self.log(extra)
        metrics.update(extra)
        return metrics

    # ------------------------------------------------------------------ marginal likelihood
    def _collecting(self) -> bool:
        """Whether this optimizer step feeds the online curvature: a sampled step (every
        ``k``-th) of a window that ends with an update."""
        online, a, state = self._online, self.args, self.state
        if online is None or not online.due(state.global_step):
            return False
        if a.marglik_steps is not None:
            return state.epoch >= a.n_epochs_burnin - 1
        ending = int(state.epoch + 1e-9) + 1  # the epoch this step belongs to, 1-based
        return ending % a.marglik_frequency == 0 and ending >= a.n_epochs_burnin

    def _apply_decoupled_prior(self) -> None:
        """``prior_application='decoupled'``: before the optimizer step (the gradient is already
        computed, as AdamW decays before its update), each trainable tensor decays towards the
        prior's mean at its parameter group's learning rate for this step."""
        if self.args.prior_application != PriorApplication.DECOUPLED or self.marglik_loop is None:
            return
        self.marglik_loop.hyper.decay_(self._params, self.optimizer, self.n_data)

    def _on_step_end(self) -> None:
        a, state = self.args, self.state
        epoch_end = state.epoch is not None and state.epoch > 0
        epoch_end = epoch_end and abs(state.epoch - round(state.epoch)) < 1e-9
        if epoch_end:
            # the epoch's log joint over all processes' shards (the same value everywhere)
            total = _sum_over_processes(float(self._epoch_loss), exact_int=False)
            items = _sum_over_processes(self._epoch_items)
            self.losses.append(total / max(items, 1))
            self._epoch_loss, self._epoch_items = 0.0, 0
        if a.marglik_steps is not None:
            due = state.global_step % a.marglik_steps == 0
        else:
            due = epoch_end and round(state.epoch) % a.marglik_frequency == 0
        if due and state.epoch >= a.n_epochs_burnin - 1e-9:
            self._marglik_update()

    def _new_laplace(self, prec, sigma, seed: int | None = None) -> Laplace:
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
            factor_rank=a.factor_rank,
            predictive_subset_of_weights=a.predictive_subset_of_weights,
            prior_mean=self._prior_mean(),
            seed=seed,
        )

    def _prior_mean(self):
        hyper = None if self.marglik_loop is None else self.marglik_loop.hyper
        return 0.0 if hyper is None or hyper.prior_mean is None else hyper.prior_mean

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

    def _fit(self, prec, sigma) -> Laplace:
        """A new Laplace approximation with these hyperparameters, fit on the curvature data."""
        # the Monte-Carlo labels of this update's pass: keyed by the step and each example
        lap = self._new_laplace(prec, sigma, derive_seed(self.args.seed, self.state.global_step))
        was_training = self.model.training
        subset = self.args.marglik_subset is not None
        dataset, weights = self._fit_dataset, None
        if self._curvature_subset is not None:
            dataset, weights = self._curvature_subset.draw_subset(self.state.global_step)
        loader = self._data_pass_loader(dataset)
        lap.fit(
            loader,
            n_data=self.n_data if subset else None,
            example_weights=weights,
            progress_bar=self._show_progress(),
        )
        self.model.train(was_training)
        if not subset and lap.n_data != self.n_data:
            warnings.warn(
                f"The Laplace fit counted {lap.n_data} data points, the loss uses N={self.n_data}.",
                RuntimeWarning,
                stacklevel=2,
            )
        return lap

    def _online_fit(self, prec, sigma) -> Laplace:
        """A new Laplace approximation from the online window's curvature."""
        return self._new_laplace(prec, sigma).fit_from(self._online.result(self.n_data))

    def _show_progress(self) -> bool:
        """A curvature pass shows a progress bar like the Trainer's (``disable_tqdm``), on the
        main process only, and only once it has taken a few seconds (``tqdm``'s ``delay``)."""
        return not self.args.disable_tqdm and self.is_local_process_zero()

    def _marglik_update(self) -> None:
        """One update of :class:`~hf_marglik.loop.MargLikLoop` at this step; a skipped one
        (non-finite fit, rejected first hyper-step) logs ``marglik_skipped``. With the online
        curvature the window's factors are used (a pass if the window holds no data: a
        sampling interval longer than the window) and a new window starts."""
        step = self.state.global_step
        fit = self._fit
        if self._online is not None:
            fit = self._online.update_fit(fit, self._online_fit, f"at step {step}")
        fit_seconds = 0.0

        def timed_fit(prec, sigma) -> Laplace:  # the update's curvature, for the logs
            nonlocal fit_seconds
            start = time.perf_counter()
            lap = fit(prec, sigma)
            fit_seconds += time.perf_counter() - start
            return lap

        start = time.perf_counter()
        lap = self.marglik_loop.update(step, timed_fit)
        total = time.perf_counter() - start
        if self._online is not None:
            self._online.reset()
        if lap is None:
            self._log_keeping_control({"marglik_skipped": 1.0})
            return
        logs = self._hyper_logs(-self.margliks[-1], lap.n_clipped)
        # wall seconds of this update: the curvature (a pass, or the online window's
        # factors) with its eigendecompositions, and the hyper-steps
        logs["marglik_fit_seconds"] = fit_seconds
        logs["marglik_hyper_seconds"] = total - fit_seconds
        self._log_keeping_control(logs)

    def _log_keeping_control(self, logs: dict[str, float]) -> None:
        """``log`` from inside ``on_step_end``: the Trainer's ``log`` resets
        ``control.should_log``, which would drop the loss line due at this very step."""
        should_log = self.control.should_log
        self.log(logs)
        self.control.should_log = should_log

    def _hyper_logs(self, log_marglik: float, n_clipped: int = 0) -> dict[str, float]:
        hyper = self.marglik_loop.hyper
        prec = hyper.prior_precision
        logs = {
            "marglik": log_marglik,
            "marglik_n_clipped": n_clipped,
            "prior_prec_mean": float(prec.mean()),
            "prior_prec_min": float(prec.min()),
            "prior_prec_max": float(prec.max()),
        }
        if self.args.prior_structure != PriorStructure.SCALAR:
            per_layer = self._per_layer(prec)
            logs.update({f"{PER_TENSOR_PREFIX}{n}": v for n, v in per_layer.items()})
        if self.args.likelihood == Likelihood.REGRESSION:
            logs["sigma_noise"] = float(hyper.sigma_noise)
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
        a, loop = self.args, self.marglik_loop
        step = self.state.global_step
        best_ckpt = self.state.best_model_checkpoint if a.load_best_model_at_end else None
        if best_ckpt is not None and os.path.isfile(os.path.join(best_ckpt, STATE_NAME)):
            # the Trainer loaded this checkpoint's parameters: take its hyperparameters too
            sd = self._read_state(best_ckpt)
            loop.hyper.load_state_dict(sd["loop"]["hyper"])
            step = int(best_ckpt.rstrip(os.sep).rsplit("-", 1)[-1])
            kept = f"the model load_best_model_at_end loaded ({best_ckpt}, by {a.metric_for_best_model})"
        elif a.restore_best_marglik and loop.best is not None:
            kept = f"the parameters of the best marginal likelihood (step {loop.best.step})"
        else:
            kept = f"the last model (step {step})"
        lap = loop.finish(step, self._fit)
        logger.info("%s keeps %s.", type(self).__name__, kept)
        if lap.fit_error is None and a.predictive_prior == PredictivePrior.GRIDSEARCH:
            self._tune_predictive_prior(lap)

    def _tune_predictive_prior(self, lap: Laplace) -> None:
        """``predictive_prior='gridsearch'``: the learned precisions times the factor with the
        lowest predictive NLL on ``eval_dataset`` (or the MAP, :func:`tune_predictive_prior`), as
        ``lap.predictive_prior_precision``."""
        a = self.args
        scale = tune_predictive_prior(
            lap,
            self.get_eval_dataloader(self.eval_dataset),  # a shard of it per process
            a.pred_type,
            a.link_approx,
            a.predictive_samples,
            sum_over_processes=True,
        )
        self.log({"predictive_prior_scale": scale})
        if math.isinf(scale):
            logger.info(
                "predictive prior: the eval split's NLL prefers the MAP to every grid value: the "
                "Laplace predictive is the MAP's (predictive_prior_precision = inf)."
            )
        else:
            logger.info("predictive prior: the learned precisions times %.3g (eval NLL).", scale)

    # ------------------------------------------------------------------ saving
    def _state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "param_names": list(self._names),
            "n_data": self.n_data,
            "loop": self.marglik_loop.state_dict(),
            "epoch_loss": self._saved_epoch[0],
            "epoch_items": self._saved_epoch[1],
            "subset_scores": (
                None if self._curvature_subset is None else self._curvature_subset.state_dict()
            ),
            "online": None if self._online is None else self._online.state_dict(),
        }

    def _on_save(self) -> None:
        if self.marglik_loop is None:
            return
        # the running epoch loss of all processes' shards (every process takes part); a
        # resumed run gives it to one process, so that the epoch's sum stays right
        self._saved_epoch = (
            _sum_over_processes(float(self._epoch_loss), exact_int=False),
            _sum_over_processes(self._epoch_items),
        )
        if not self.args.should_save:
            return
        folder = checkpoint_folder(self._run_dir(), self.state.global_step)
        if not os.path.isdir(folder):
            warnings.warn(
                f"Checkpoint folder {folder} not found; marglik state not saved.", stacklevel=2
            )
            return
        save_torch(self._state_dict(), os.path.join(folder, STATE_NAME))

    def _run_dir(self) -> str:
        """The folder of this run's checkpoints: ``output_dir``, or in a trial of an optuna
        search the Trainer's ``output_dir/run-<trial number>`` (``hp_name(trial)`` if given)."""
        trial = self._search_trial
        number = getattr(trial, "number", None)
        if getattr(self, "hp_search_backend", None) is None or number is None:
            return self.args.output_dir
        hp_name = getattr(self, "hp_name", None)
        return os.path.join(self.args.output_dir, hp_name(trial) if hp_name else f"run-{number}")

    def _read_state(self, checkpoint: str) -> dict:
        """The state file of ``checkpoint``, in the current format (version 1 files, written by
        hf_marglik 0.1, are converted)."""
        path = os.path.join(checkpoint, STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: {checkpoint} was not written by {type(self).__name__} (or "
                "another marginal-likelihood trainer), so the hyperparameters cannot be resumed. "
                "Resume from such a checkpoint or start without resume_from_checkpoint."
            )
        sd = torch.load(path, map_location=self._params[0].device, weights_only=True)
        if sd["param_names"] != self._names:
            raise ValueError(f"{path} was saved for different trainable parameters.")
        if sd.get("version", 1) == 1:
            best = sd["best"]
            sd["loop"] = {
                "hyper": sd["hyper"],
                "best": None if best is None else {**best, "value": sd["best_marglik"]},
                "margliks": sd["margliks"],
                "losses": sd["losses"],
                "update_steps": sd["marglik_update_steps"],
                "skipped_steps": sd.get("marglik_skipped_steps", []),
            }
        return sd

    def _load_state(self, checkpoint: str) -> None:
        sd = self._read_state(checkpoint)
        self.marglik_loop.load_state_dict(sd["loop"])
        saved_init = self.marglik_loop.hyper.prior_mean is not None
        if saved_init != (self.args.prior_mean == PriorMean.INIT):
            raise ValueError(
                f"{checkpoint} was trained with prior_mean="
                f"{'init' if saved_init else 'zero'!r}, this run has "
                f"prior_mean={self.args.prior_mean.value!r}: resume with the checkpoint's setting."
            )
        if self.args.process_index == 0:  # the epoch's running sums, over all processes
            self._epoch_loss, self._epoch_items = sd["epoch_loss"], sd["epoch_items"]
        if self._curvature_subset is not None and sd.get("subset_scores") is not None:
            self._curvature_subset.load_state_dict(sd["subset_scores"])
        if self._online is not None and sd.get("online") is not None:
            self._online.load_state_dict(sd["online"])

    def hyperparameters(self) -> dict:
        """The hyperparameters as plain JSON data: final ones after :meth:`train`, else current."""
        loop, a = self.marglik_loop, self.args
        if loop is None:
            raise RuntimeError("No hyperparameters yet: call train() first.")
        prec = loop.prior_precision.detach().cpu().double()
        out = {
            "likelihood": a.likelihood.value,
            "prior_structure": a.prior_structure.value,
            "hessian_structure": a.hessian_structure.value,
            "backend": a.backend.value,
            "temperature": a.temperature,
            "sigma_noise": float(loop.sigma_noise),
            "n_data": self.n_data,
            "log_marglik": self.best_marglik,
            "param_names": list(self._names),
            "prior_precision_per_tensor": self._per_layer(prec),
        }
        if prec.numel() <= 100_000:
            out["prior_precision"] = prec.tolist()
        return out

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` and beside it ``marglik_hyperparameters.json`` (and, for a
        diagonal prior over more than 100k parameters, ``marglik_prior_precision.safetensors``)
        and, after :meth:`train`, the final posterior (:meth:`Laplace.save_pretrained`:
        ``laplace_posterior.safetensors``, ``laplace_config.json``; not when the final fit was
        not finite). No pickle."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.marglik_loop is None or not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        data = self.hyperparameters()
        if "prior_precision" not in data:
            prec = self.marglik_loop.prior_precision.detach().cpu().clone()
            save_tensors({"prior_precision": prec}, os.path.join(output_dir, PRIOR_PRECISION_NAME))
        lap = self.laplace
        if self.marglik_loop.final is not None and lap is not None and lap.fit_error is None:
            lap.save_pretrained(output_dir)  # the final posterior, at the saved parameters
        save_json(data, os.path.join(output_dir, HYPERPARAMETERS_NAME))


class MargLikTrainer(MargLikTrainerMixin, Trainer):
    """A ``Trainer`` that learns the prior precision (and observation noise) by the Laplace
    marginal likelihood while it trains the model on the log joint: swap it for
    ``transformers.Trainer`` and ``MargLikTrainingArguments`` for ``TrainingArguments``.
    Everything it adds is described in :class:`MargLikTrainerMixin`."""


def _sum_over_processes(n: float, exact_int: bool = True):
    """``n`` summed over the processes of a ``torch.distributed`` group (``n`` alone otherwise);
    an int unless ``exact_int=False``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    total = float(sum_over_processes(torch.tensor(float(n), dtype=torch.float64)))
    return int(total) if exact_int else total
