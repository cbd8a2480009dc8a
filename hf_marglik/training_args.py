"""``MargLikTrainingArguments``: ``TrainingArguments`` plus the settings of marginal-likelihood
training, named and defaulted as in laplace-torch's ``marglik_training``.

The settings live in :class:`MargLikArguments`, a dataclass mixin that any ``TrainingArguments``
subclass can take first in its bases (TRL's ``SFTConfig`` in :mod:`hf_marglik.sft`)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .hyper import check_settings
from .memory import parse_bytes
from .options import (
    Backend,
    CurvatureSource,
    HessianStructure,
    KFACApprox,
    Likelihood,
    LinkApprox,
    PredictivePrior,
    PredType,
    PriorApplication,
    PriorMean,
    PriorStructure,
    SubsetOfWeights,
    SubsetSampling,
    coerce,
)


@dataclass
class MargLikArguments:
    """The marginal-likelihood settings of :class:`MargLikTrainingArguments` (and of
    ``MargLikSFTConfig``): a mixin, put first in the bases of a ``TrainingArguments`` subclass.

    Model and likelihood:
        likelihood: ``"classification"`` (one label per sequence), ``"regression"`` (Gaussian)
            or ``"causal_lm"`` (one categorical per target token).
        dict_key_x, dict_key_y: the batch keys of the model's main input and of the targets;
            the targets are never passed to the model, the loss is computed from the logits.

    Laplace approximation (the curvature behind the marginal likelihood):
        hessian_structure: ``"kron"`` (K-FAC, default), ``"diag"`` or ``"full"`` (tiny models).
        backend: ``"ggn-mc"`` (Monte-Carlo GGN, default: one backward per sample, the choice for
            a large vocabulary), ``"ggn"`` (exact GGN, one backward per class; laplace-torch's
            default) or ``"ef"`` (empirical Fisher).
        kfac_approx: ``"expand"`` / ``"reduce"`` for layers applied at every token; None picks
            expand (measured closer to the exact GGN; BENCHMARKS.md, "K-FAC fidelity").
        n_mc_samples: samples per data point for ``"ggn-mc"``.
        marglik_subset: fit the curvature on a subset of the training data: a fraction in
            (0, 1] or, above 1, a number of examples. The curvature and the loss are rescaled to
            the full data count. Right when a curvature pass over the whole training set costs
            too much (it costs about one to a few epochs); the marginal likelihood is then an
            estimate.
        marglik_subset_sampling: ``"curvature"`` (default for classification): a fresh subset
            per fit, example ``n`` drawn with probability ``∝ 1 − Σ_c p_c²`` (its output
            curvature, recorded from the training forward pass that last saw it) and weighted
            by ``1/π_n``, an unbiased estimate with far less spread than a uniform subset's
            (:mod:`hf_marglik.subset`); ``"uniform"`` (default otherwise): one random subset,
            drawn once with ``seed``, for every fit.
        marglik_curvature: ``"online"`` (default): gathered from the training steps since the
            last update (layer inputs from the training forward passes, one extra backward of
            sampled labels on every ``k``-th step; :mod:`hf_marglik.online`); ``"fit"`` (the
            default when ``marglik_subset`` is set; laplace-torch's): a pass over the training
            data (or the ``marglik_subset``) at every update, about one epoch each.
        marglik_budget: for ``"online"``: the extra compute allowed, a fraction of training in
            (0, 1]; the interval is ``k = ceil((2/3) / budget)`` (an extra backward costs about
            2/3 of a training step). None: 0.25, every 3rd step.
        factor_rank: memory-bounded K-FAC for wide layers (large models): factors wider than
            ``2·factor_rank + 10`` are kept as a streaming sketch, their ``factor_rank`` leading
            eigenpairs and a two-moment tail (see hf_marglik/factors.py). None (default): dense.
        enable_backprop: laplace-torch's flag; accepted for compatibility, ``True`` is refused.

    Prior and hyperparameter optimisation:
        prior_structure: ``"scalar"``, ``"layerwise"`` (one precision per trainable tensor,
            default) or ``"diag"`` (one per parameter).
        prior_prec_init, sigma_noise_init: initial prior precision and observation noise.
        prior_mean: ``"zero"`` (default, laplace-torch's) or ``"init"``: centre the prior at the
            trainable parameters when training starts, so that it pulls the update, not LoRA
            A's random initialisation, to zero (saved in checkpoints and the posterior).
        prior_application: ``"decoupled"`` (None, the default, picks it; a ``weight_decay > 0``
            is then set to 0 with a warning, as before, where an explicit ``"decoupled"``
            beside it is refused): the loss is the likelihood, and at every
            optimizer step each tensor decays towards ``μ`` by ``lr·δ_l/(N·c)``, outside the
            optimiser's preconditioner) or ``"loss"`` (laplace-torch's and ``marglik_training``'s
            default: the prior term in the loss); :class:`~hf_marglik.PriorApplication`. With
            Adam the prior in the loss shrinks LoRA A's initialisation by lr-sized steps while
            B is 0 and made the SmolLM2 MAP worse than plain fine-tuning (docs/study.md).
        tie_lora_prior: one precision per LoRA adapter (its ``lora_A`` and ``lora_B``) and per
            other module, instead of per tensor (:func:`~hf_marglik.lora.lora_groups`).
        freeze_lora_a: train LoRA ``B`` only, ``A`` frozen at its random initialisation; the
            prior and the Laplace approximation are then over ``B`` and the heads. It changes
            which parameters of the model train, so it is off by default and logged when on.
        max_log_prior_step: a trust region on each update: ``log δ`` moves by at most this much
            per update (None: unbounded).
        temperature: likelihood temperature (laplace-torch's convention).
        fix_sigma_noise: keep the observation noise at ``sigma_noise_init`` (regression).
        lr_hyp: Adam step size on the log hyperparameters.
        n_hypersteps: hyperparameter steps per marginal-likelihood estimate.

    Schedule:
        n_epochs_burnin: no marginal-likelihood step before this many completed epochs.
        marglik_frequency: estimate after every ``marglik_frequency``-th epoch (1: every epoch).
        marglik_steps: estimate every ``marglik_steps`` optimizer steps instead of by epochs.
            Right for runs shorter than a few epochs (one LLM epoch), where epoch boundaries
            would give too few hyperparameter updates; ``marglik_frequency`` is then unused.
        restore_best_marglik: at the end, restore the trainable parameters with the best
            marginal likelihood seen (laplace-torch's behaviour); False keeps the last model.
            None (default): True with ``prior_application="loss"`` unless
            ``load_best_model_at_end`` is set, whose choice (by ``metric_for_best_model``) then
            wins; False with ``"decoupled"``, where training does not climb the log joint and
            an early update's evidence (a less trained point at other precisions) can win.
            Both True is refused.

    Evaluation (classification): ``evaluate()`` reports accuracy, NLL, ECE (15 bins) and Brier
    score of the MAP model (``eval_map_accuracy`` …) and of the Laplace predictive
    (``eval_laplace_accuracy`` …):
        eval_laplace: report the Laplace predictive at all (default True; it costs about one
            backward pass per class per evaluation batch with ``"glm"``).
        predictive_prior: ``"marglik"`` (default): the predictive uses the learned precisions;
            ``"gridsearch"``: after training, the learned precisions times one factor chosen by
            the predictive's NLL on ``eval_dataset`` (laplace-torch's gridsearch, relative to
            the learned values), stored as ``laplace.predictive_prior_precision`` and saved in
            the posterior file; the learned precisions stay the marginal likelihood's. The MAP
            is a candidate too (the grid's limit; probit and mc links, and ``"nn"``): where the
            eval NLL prefers it, the precision is ``inf`` and the predictive is the MAP's.
        predictive_subset_of_weights: the tensors the predictive marginalises over: ``"all"``
            (default) or ``"last_layer"`` (the trained head only, the LoRA adapters staying at
            the MAP; for a model without a trained head, the adapters of the last adapted layer:
            Laplace-LoRA's last-layer variant; laplace-torch's ``subset_of_weights``). Training
            and the marginal likelihood are over all trainable tensors either way; saved with
            the posterior.
        pred_type: ``"glm"`` (linearised network, default) or ``"nn"`` (parameter samples).
        link_approx: ``"probit"`` (default), ``"mc"``, ``"bridge"`` or ``"bridge_norm"`` (the
            Laplace bridge; :class:`~hf_marglik.LinkApprox`) for the glm predictive.
        predictive_samples: samples of the ``"nn"`` predictive or of the ``"mc"`` link.

    Memory:
        marglik_memory_budget: the most bytes the curvature may hold at once (an int, or a
            string such as ``"8GB"`` or ``"500MiB"``). When training starts the trainers log
            the planned memory (:func:`hf_marglik.memory.estimate_curvature_memory`: K-FAC
            factors or their sketches, eigenbases, the online window's sums, the GLM
            predictive's Jacobians) and refuse a plan above the budget with a ``ValueError``
            that names the settings that shrink it. None (default): what the device can spare,
            on CUDA its free memory (``torch.cuda.mem_get_info`` plus the allocator's unused
            reserve), on CPU 80% of the available system memory (``MemAvailable``); no check
            on other devices.

    Interruptions:
        save_on_sigterm: on SIGTERM, save a checkpoint at the next optimizer-step boundary and
            stop training (default True; :mod:`hf_marglik.preemption`). transformers'
            ``enable_jit_checkpoint=True`` is taken as this (its checkpoints would lack
            ``marglik_state.pt``) and set back to False with a warning.

    ``weight_decay`` must stay 0: the learned prior replaces it (a positive value is set to 0
    with a warning, as laplace-torch does). ``dataloader_pin_memory`` is turned off when no
    accelerator is available (pinning does nothing there, and torch warns on every data pass).
    """

    likelihood: str = field(
        default="classification",
        metadata={"help": "Likelihood: 'classification', 'regression' or 'causal_lm'."},
    )
    hessian_structure: str = field(
        default="kron",
        metadata={
            "help": "Curvature structure of the Laplace approximation: 'kron', 'diag', 'full'."
        },
    )
    backend: str = field(
        default="ggn-mc",
        metadata={
            "help": "Curvature: 'ggn-mc' (Monte-Carlo GGN, default), 'ggn' (exact GGN, one "
            "backward per class) or 'ef'."
        },
    )
    prior_structure: str = field(
        default="layerwise",
        metadata={"help": "Prior precision structure: 'scalar', 'layerwise' or 'diag'."},
    )
    lr_hyp: float = field(
        default=0.1, metadata={"help": "Adam learning rate of the log hyperparameters."}
    )
    n_epochs_burnin: int = field(
        default=0,
        metadata={"help": "Epochs to complete before the first marginal-likelihood step."},
    )
    n_hypersteps: int = field(
        default=10, metadata={"help": "Hyperparameter steps per marginal-likelihood estimate."}
    )
    marglik_frequency: int = field(
        default=1,
        metadata={"help": "Estimate the marginal likelihood after every n-th epoch."},
    )
    prior_prec_init: float = field(default=1.0, metadata={"help": "Initial prior precision."})
    prior_mean: str = field(
        default="zero",
        metadata={
            "help": "Centre of the prior: 'zero' or 'init' (the trainable parameters when "
            "training starts: the prior then pulls the update, not LoRA A's init, to zero).",
            "choices": ["zero", "init"],
        },
    )
    prior_application: str | None = field(
        default=None,
        metadata={
            "help": "How the prior acts on training: 'decoupled' (None, the default, picks it: the loss is the "
            "likelihood; at each optimizer step theta <- theta - lr*(delta/N)*(theta - mu), as "
            "AdamW's weight decay) or 'loss' (laplace-torch's: its term in the loss, through "
            "the optimizer).",
            "choices": [o.value for o in PriorApplication],
        },
    )
    tie_lora_prior: bool = field(
        default=False,
        metadata={
            "help": "One learned precision per LoRA adapter, shared by its lora_A and lora_B "
            "(and one per other module), instead of one per tensor (prior_structure="
            "'layerwise')."
        },
    )
    freeze_lora_a: bool = field(
        default=False,
        metadata={
            "help": "Train LoRA B only, with A frozen at its random initialisation (changes "
            "which parameters train; logged). Prior and Laplace are then over B and the heads."
        },
    )
    max_log_prior_step: float | None = field(
        default=None,
        metadata={
            "help": "Trust region: the largest change of each log prior precision in one "
            "marginal-likelihood update (e.g. 1.0). None: unbounded."
        },
    )
    sigma_noise_init: float = field(
        default=1.0, metadata={"help": "Initial observation noise (regression)."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Likelihood temperature (laplace-torch's convention)."}
    )
    fix_sigma_noise: bool = field(
        default=False,
        metadata={"help": "Keep the observation noise at sigma_noise_init (regression)."},
    )
    enable_backprop: bool = field(
        default=False,
        metadata={
            "help": "laplace-torch's flag for a marginal likelihood differentiable in the model "
            "parameters; accepted for compatibility, True is refused (the curvature is detached)."
        },
    )
    dict_key_x: str = field(
        default="input_ids", metadata={"help": "Batch key of the model's main input."}
    )
    dict_key_y: str = field(default="labels", metadata={"help": "Batch key of the targets."})
    kfac_approx: str | None = field(
        default=None,
        metadata={
            "help": "K-FAC for weight sharing: 'expand' or 'reduce'; default (None): expand, "
            "measured closer to the exact GGN (BENCHMARKS.md)."
        },
    )
    n_mc_samples: int = field(
        default=1, metadata={"help": "Monte-Carlo samples per data point for backend 'ggn-mc'."}
    )
    marglik_steps: int | None = field(
        default=None,
        metadata={
            "help": "Estimate the marginal likelihood every n optimizer steps instead of by "
            "epochs (for runs under a few epochs)."
        },
    )
    marglik_subset: float | None = field(
        default=None,
        metadata={
            "help": "Fit the curvature on a random subset of the training data: a fraction in "
            "(0, 1] or a number of examples (> 1); rescaled to the full data count."
        },
    )
    marglik_subset_sampling: str | None = field(
        default=None,
        metadata={
            "help": "How the marglik_subset is drawn: 'curvature' (a fresh subset per fit, "
            "examples drawn in proportion to their output curvature and weighted by the inverse; "
            "classification only) or 'uniform' (one random subset). None: 'curvature' for "
            "classification, 'uniform' otherwise."
        },
    )
    marglik_curvature: str | None = field(
        default=None,
        metadata={
            "help": "Curvature of an update: 'online' (gathered from the training steps since "
            "the last update) or 'fit' (a pass over the training data at the update). Default: "
            "'online', or 'fit' when marglik_subset is set.",
            "choices": ["fit", "online"],
        },
    )
    marglik_budget: float | None = field(
        default=None,
        metadata={
            "help": "marglik_curvature='online': extra compute allowed, a fraction of training "
            "in (0, 1]; every ceil((2/3)/budget)-th step gets one extra backward. Default: 0.25 "
            "(every 3rd step)."
        },
    )
    factor_rank: int | None = field(
        default=None,
        metadata={
            "help": "Memory-bounded K-FAC: keep factors wider than 2*factor_rank+10 as their "
            "factor_rank leading eigenpairs plus a two-moment tail (streaming sketch); "
            "None keeps dense factors."
        },
    )
    restore_best_marglik: bool | None = field(
        default=None,
        metadata={
            "help": "Restore the parameters with the best marginal likelihood at the end; "
            "False keeps the last model. Default: True with prior_application='loss' unless "
            "load_best_model_at_end is set, else False."
        },
    )
    eval_laplace: bool = field(
        default=True,
        metadata={
            "help": "evaluate() also reports the Laplace predictive's accuracy, NLL, ECE and "
            "Brier (eval_laplace_*; classification); costs one backward per class per batch."
        },
    )
    predictive_prior: str = field(
        default="marglik",
        metadata={
            "help": "Prior precision of the predictive: 'marglik' (the learned precisions) or "
            "'gridsearch' (the learned precisions times a factor chosen by the predictive's NLL "
            "on eval_dataset after training, or the MAP itself where that NLL prefers it; the "
            "learned ones are kept for the marginal likelihood).",
            "choices": ["marglik", "gridsearch"],
        },
    )
    predictive_subset_of_weights: str = field(
        default="all",
        metadata={
            "help": "Tensors the predictive marginalises over: 'all' or 'last_layer' (the "
            "trained head, or without one the LoRA adapters of the last adapted layer; the other "
            "tensors stay at the MAP). The marginal likelihood is over all.",
            "choices": ["all", "last_layer"],
        },
    )
    pred_type: str = field(
        default="glm",
        metadata={
            "help": "Laplace predictive reported by evaluate() as eval_laplace_* "
            "(classification): 'glm' (linearised) or 'nn' (parameter samples)."
        },
    )
    link_approx: str = field(
        default="probit",
        metadata={
            "help": "Link of the 'glm' predictive: 'probit' (closed form), 'mc', 'bridge' or "
            "'bridge_norm' (the Laplace bridge)."
        },
    )
    predictive_samples: int = field(
        default=100,
        metadata={"help": "Samples of the 'nn' predictive or of the 'mc' link."},
    )
    marglik_memory_budget: int | str | None = field(
        default=None,
        metadata={
            "help": "Most bytes the curvature may hold (K-FAC factors, eigenbases, the online "
            "window, the predictive's Jacobians): an int or a string like '8GB' or '500MiB'; "
            "training is refused before the first step when the estimate exceeds it. None: "
            "what the device can spare (CUDA: its free memory; CPU: 80 percent of MemAvailable)."
        },
    )
    save_on_sigterm: bool = field(
        default=True,
        metadata={
            "help": "On SIGTERM (preemption), save a checkpoint at the next optimizer step and "
            "stop training; resume with resume_from_checkpoint."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.pred_type = coerce(PredType, self.pred_type, "pred_type")
        self.predictive_prior = coerce(PredictivePrior, self.predictive_prior, "predictive_prior")
        self.prior_mean = coerce(PriorMean, self.prior_mean, "prior_mean")
        # None: decoupled, and a weight_decay > 0 is replaced by the learned prior (set to 0
        # with a warning, below), so a pipeline with its own weight decay swaps in unchanged;
        # an explicit "decoupled" beside a weight_decay > 0 is refused in _check_lora_prior
        explicit = self.prior_application is not None
        self._prior_application_set = explicit  # not a field: the trainer's optimizer check
        self.prior_application = coerce(
            PriorApplication, self.prior_application or "decoupled", "prior_application"
        )
        self.predictive_subset_of_weights = coerce(
            SubsetOfWeights, self.predictive_subset_of_weights, "predictive_subset_of_weights"
        )
        self.link_approx = coerce(LinkApprox, self.link_approx, "link_approx")
        if self.marglik_memory_budget is not None:
            self.marglik_memory_budget = parse_bytes(self.marglik_memory_budget)
        if self.factor_rank is not None and self.factor_rank < 1:
            raise ValueError(f"factor_rank={self.factor_rank} is invalid; set it to >= 1 or None.")
        if self.predictive_samples < 1:
            raise ValueError(
                f"predictive_samples={self.predictive_samples} is invalid; set it to >= 1."
            )
        self.likelihood = coerce(Likelihood, self.likelihood, "likelihood")
        self.hessian_structure = coerce(
            HessianStructure, self.hessian_structure, "hessian_structure"
        )
        self.backend = coerce(Backend, self.backend, "backend")
        self.prior_structure = coerce(PriorStructure, self.prior_structure, "prior_structure")
        self._check_lora_prior(explicit)
        if self.kfac_approx is not None:
            self.kfac_approx = coerce(KFACApprox, self.kfac_approx, "kfac_approx")
        check_settings(
            lr_hyp=self.lr_hyp,
            n_hypersteps=self.n_hypersteps,
            marglik_frequency=self.marglik_frequency,
            n_epochs_burnin=self.n_epochs_burnin,
            prior_prec_init=self.prior_prec_init,
            sigma_noise_init=self.sigma_noise_init,
            temperature=self.temperature,
            enable_backprop=self.enable_backprop,
        )
        if self.n_mc_samples < 1:
            raise ValueError(f"n_mc_samples={self.n_mc_samples} is invalid; set it to >= 1.")
        if self.marglik_steps is not None and self.marglik_steps < 1:
            raise ValueError(
                f"marglik_steps={self.marglik_steps} is invalid; set it to a number of optimizer "
                "steps >= 1, or None to estimate by epochs (marglik_frequency)."
            )
        self._check_subset()
        if self.marglik_curvature is None:
            self.marglik_curvature = "fit" if self.marglik_subset is not None else "online"
        self.marglik_curvature = coerce(
            CurvatureSource, self.marglik_curvature, "marglik_curvature"
        )
        self._check_online()
        if (
            self.predictive_prior == PredictivePrior.GRIDSEARCH
            and self.likelihood == Likelihood.CAUSAL_LM
        ):
            raise ValueError(
                "predictive_prior='gridsearch' tunes the GLM predictive of one output vector per "
                "example; likelihood='causal_lm' has one per token over the vocabulary. Use "
                "predictive_prior='marglik'."
            )
        if self.weight_decay > 0:
            warnings.warn(
                f"weight_decay={self.weight_decay} is set to 0: the learned prior precision "
                "replaces weight decay in marginal-likelihood training.",
                UserWarning,
                stacklevel=2,
            )
            self.weight_decay = 0.0
        if getattr(self, "enable_jit_checkpoint", False):  # transformers < 5.x has no such field
            warnings.warn(
                "enable_jit_checkpoint is replaced by save_on_sigterm=True: transformers' JIT "
                "checkpoint skips on_save, so it would lack MargLikTrainer's state.",
                UserWarning,
                stacklevel=2,
            )
            self.enable_jit_checkpoint, self.save_on_sigterm = False, True
        if self.restore_best_marglik is None:
            # with the decoupled prior, training does not climb the log joint, and an early
            # update's evidence (a less trained point, other precisions) can win: keep the last
            loss = self.prior_application == PriorApplication.LOSS
            self.restore_best_marglik = loss and not self.load_best_model_at_end
        elif self.load_best_model_at_end and self.restore_best_marglik:
            raise ValueError(
                "load_best_model_at_end=True and restore_best_marglik=True both pick the final "
                "model; leave restore_best_marglik unset (load_best_model_at_end then decides) "
                "or set one of them to False."
            )
        if self.dataloader_pin_memory and not accelerator_available():
            # pinning does nothing without an accelerator, and torch warns about it on every
            # data pass (each epoch, each curvature fit, each evaluation)
            self.dataloader_pin_memory = False
        if self.label_smoothing_factor != 0:
            raise ValueError(
                "label_smoothing_factor must be 0: MargLikTrainer computes the likelihood itself "
                "and a smoothed likelihood would not match the Laplace marginal likelihood."
            )
        if self.marglik_subset_sampling is None:
            self.marglik_subset_sampling = (
                SubsetSampling.CURVATURE
                if self.likelihood == Likelihood.CLASSIFICATION
                else SubsetSampling.UNIFORM
            )
        self.marglik_subset_sampling = coerce(
            SubsetSampling, self.marglik_subset_sampling, "marglik_subset_sampling"
        )
        if (
            self.marglik_subset_sampling == SubsetSampling.CURVATURE
            and self.likelihood != Likelihood.CLASSIFICATION
        ):
            raise ValueError(
                f"marglik_subset_sampling='curvature' needs likelihood='classification' (got "
                f"{self.likelihood.value!r}); use 'uniform' or leave it None."
            )
        if self.fix_sigma_noise and self.likelihood != Likelihood.REGRESSION:
            warnings.warn(
                "fix_sigma_noise only applies to likelihood='regression'; it has no effect here.",
                UserWarning,
                stacklevel=2,
            )

    def _check_lora_prior(self, explicit: bool) -> None:
        """The LoRA-prior settings (their model checks come when the trainer sees the model)."""
        if (
            explicit
            and self.prior_application == PriorApplication.DECOUPLED
            and self.weight_decay > 0
        ):
            raise ValueError(
                f"prior_application='decoupled' decays the parameters by the learned prior, and "
                f"weight_decay={self.weight_decay} would decay them a second time. Set "
                "weight_decay=0."
            )
        if self.tie_lora_prior and self.prior_structure != PriorStructure.LAYERWISE:
            raise ValueError(
                f"tie_lora_prior ties the per-tensor precisions of a layerwise prior; "
                f"prior_structure={self.prior_structure.value!r}. Set prior_structure='layerwise'."
            )
        m = self.max_log_prior_step
        if m is not None and not (m > 0 and math.isfinite(m)):
            raise ValueError(
                f"max_log_prior_step={m!r} is invalid; set it to a positive float (e.g. 1.0) or "
                "None."
            )

    def _check_online(self) -> None:
        online = self.marglik_curvature == CurvatureSource.ONLINE
        if self.marglik_budget is not None:
            if not online:
                raise ValueError(
                    "marglik_budget sets the sampling interval of marglik_curvature='online'; "
                    "set marglik_curvature='online' or leave marglik_budget None."
                )
            if not (0 < self.marglik_budget <= 1):
                raise ValueError(
                    f"marglik_budget={self.marglik_budget!r} is invalid; set it to a fraction "
                    "of the training compute in (0, 1], e.g. 0.25."
                )
        if online and self.marglik_subset is not None:
            raise ValueError(
                "marglik_subset chooses the data of a curvature pass, and "
                "marglik_curvature='online' makes no pass; use one of them."
            )

    def _check_subset(self) -> None:
        s = self.marglik_subset
        if s is None:
            return
        if not (s > 0 and math.isfinite(s)) or (s > 1 and s != int(s)):
            raise ValueError(
                f"marglik_subset={s!r} is invalid; set it to a fraction in (0, 1], a whole "
                "number of examples > 1, or None to fit the curvature on all training data."
            )


@dataclass
class MargLikTrainingArguments(MargLikArguments, TrainingArguments):
    """Arguments of :class:`~hf_marglik.MargLikTrainer`: all of ``transformers.TrainingArguments``
    plus the marginal-likelihood settings of :class:`MargLikArguments`."""


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, MPS, ...) that pinned memory would serve."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return bool(accelerator.is_available())
    return bool(torch.cuda.is_available())
