"""Option enums. Every option is a ``str`` Enum: pass the enum member or its string value.

Names follow laplace-torch (``Likelihood``, ``HessianStructure``, ``PriorStructure``) where a user
would look for them.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar


class Likelihood(str, Enum):
    """The likelihood that the model's logits parameterise."""

    CLASSIFICATION = "classification"
    """One categorical label per example (sequence); logits of shape ``(batch, classes)``."""
    REGRESSION = "regression"
    """Gaussian with learned observation noise; outputs of shape ``(batch, outputs)``."""
    CAUSAL_LM = "causal_lm"
    """One categorical per target token; logits ``(batch, seq, vocab)`` predict ``labels``
    shifted by one (the HF convention). Tokens labelled -100 and padding are not data."""


class HessianStructure(str, Enum):
    """Structure of the curvature (and so of the posterior precision)."""

    KRON = "kron"
    """Kronecker-factored (K-FAC) block per trainable tensor. The main structure."""
    DIAG = "diag"
    """Diagonal of the GGN/Fisher."""
    FULL = "full"
    """Dense matrix over all trainable parameters: the exact-GGN reference, small models only."""


class Backend(str, Enum):
    """Which curvature is computed."""

    GGN = "ggn"
    """Exact generalised Gauss-Newton: one backward pass per output (class) of the likelihood."""
    GGN_MC = "ggn-mc"
    """Monte-Carlo GGN (Fisher): targets sampled from the model, one backward per sample.
    The choice for large output spaces such as an LLM's vocabulary."""
    EF = "ef"
    """Empirical Fisher: outer products of the gradients at the observed targets."""


class KFACApprox(str, Enum):
    """K-FAC for layers applied at every position of a sequence (Eschenhagen et al., 2023)."""

    EXPAND = "expand"
    """Every position is treated as its own example: exact for deep linear networks with a
    loss per position (causal LM)."""
    REDUCE = "reduce"
    """Inputs are averaged and output gradients summed over a sequence's positions before the
    outer products: exact for deep linear networks with one loss per sequence."""


class PriorStructure(str, Enum):
    """Structure of the prior precision."""

    SCALAR = "scalar"
    """One precision shared by all trainable parameters."""
    LAYERWISE = "layerwise"
    """One precision per trainable tensor."""
    DIAG = "diag"
    """One precision per trainable parameter."""


class SubsetOfWeights(str, Enum):
    """Which trainable tensors a Laplace approximation (or its predictive) is over
    (laplace-torch's ``subset_of_weights``)."""

    ALL = "all"
    """Every trainable tensor (LoRA adapters and a trained head)."""
    LAST_LAYER = "last_layer"
    """The trainable tensors of the last module that has any, in ``named_modules()`` order:
    the classification head of a Hugging Face sequence classifier trained with
    ``modules_to_save``, the last ``nn.Linear`` of an MLP. Where that module is a LoRA adapter,
    the adapters (``lora_A``, ``lora_B``) of the last adapted layer: Laplace-LoRA's last-layer
    variant (the LoRA of the LM head when it has one; otherwise, say, the last ``v_proj``, so
    that the predictive's Jacobians backpropagate through the last block only). The other
    tensors stay at the MAP."""


class SubsetSampling(str, Enum):
    """How the examples of a curvature subset (``marglik_subset``) are drawn."""

    UNIFORM = "uniform"
    """One random subset, drawn once and used for every fit."""
    CURVATURE = "curvature"
    """A fresh subset per fit, example ``n`` drawn with probability proportional to its output
    curvature ``1 − Σ_c p_c²`` and weighted by the inverse (classification only;
    :mod:`hf_marglik.subset`)."""


E = TypeVar("E", bound=Enum)


def coerce(enum_cls: type[E], value: str | E, name: str) -> E:
    """Return ``value`` as a member of ``enum_cls``, or raise a ``ValueError`` naming the choices."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{name}={value!r} is not valid; choose one of {choices}.") from None


class PredType(str, Enum):
    """How the posterior predictive is formed (laplace-torch's names)."""

    GLM = "glm"
    """Linearised network: the outputs are Gaussian with covariance ``J Σ Jᵀ``."""
    NN = "nn"
    """Monte-Carlo over parameter samples from the posterior, averaging the softmax."""


class LinkApprox(str, Enum):
    """How the GLM's Gaussian over logits is pushed through the softmax."""

    PROBIT = "probit"
    """Closed form: ``softmax(f / sqrt(1 + π/8 · diag(J Σ Jᵀ)))`` (MacKay's probit)."""
    MC = "mc"
    """Monte-Carlo samples of the logits from the Gaussian."""
    BRIDGE = "bridge"
    """The Laplace bridge (Hobbhahn et al., UAI 2022): the Gaussian, conditioned on zero-sum
    logits, matched to a Dirichlet; the Dirichlet's mean."""
    BRIDGE_NORM = "bridge_norm"
    """The Laplace bridge after rescaling logits and variances to a mean variance of
    ``sqrt(K/2)`` per class (laplace-torch's variance correction)."""


class TuningMethod(str, Enum):
    """How :meth:`~hf_marglik.Laplace.optimize_prior_precision` tunes the prior after fitting
    (laplace-torch's names)."""

    MARGLIK = "marglik"
    """Gradient steps on the log marginal likelihood."""
    GRIDSEARCH = "gridsearch"
    """The value of a log grid with the lowest predictive loss on validation data."""


class CurvatureSource(str, Enum):
    """Where a marginal-likelihood update's curvature comes from (:mod:`hf_marglik.online`)."""

    FIT = "fit"
    """A pass over the training data (or ``marglik_subset``) at the update, in eval mode:
    laplace-torch's ``marglik_training``; costs about one epoch per update."""
    ONLINE = "online"
    """Gathered from the training steps since the last update: layer inputs from the training
    forward passes, output gradients from one extra backward of sampled labels on every
    ``k``-th step (``marglik_budget``)."""


class PriorMean(str, Enum):
    """Where the trainers' Gaussian prior over the trainable tensors is centred."""

    ZERO = "zero"
    """``μ = 0`` (laplace-torch's and Immer et al.'s)."""
    INIT = "init"
    """``μ = θ₀``, the trainable parameters when training starts (LoRA A's random
    initialisation, LoRA B's zeros, a new head's initialisation): the prior then pulls the
    update ``θ − θ₀`` to 0, not LoRA A itself. Saved in the checkpoints and the posterior."""


class PriorApplication(str, Enum):
    """How the trainers apply the learned prior to the network's training."""

    LOSS = "loss"
    """The prior term ``½(θ − μ)ᵀP(θ − μ)/(N·c)`` is part of the loss (laplace-torch's and
    Immer et al.'s log joint); its gradient passes through the optimiser's preconditioner (for
    Adam, each tensor's prior gradient is rescaled into steps of about the learning rate)."""
    DECOUPLED = "decoupled"
    """The loss is the likelihood alone; at every optimizer step each tensor decays towards the
    prior's mean, ``θ ← θ − lr·(δ_l/(N·c))·(θ − μ)``, outside the optimiser and before its
    update (AdamW's decoupled weight decay with the learned strength ``δ_l/(N·c)``). With SGD
    both are the same step; with Adam the decay is not rescaled by the preconditioner."""


class PredictivePrior(str, Enum):
    """The prior precision of a trainer's posterior predictive (``trainer.laplace(...)``)."""

    MARGLIK = "marglik"
    """The precisions the marginal likelihood learned."""
    GRIDSEARCH = "gridsearch"
    """The learned precisions times one factor ``k`` from ``logspace(-4, 4, 100)``, chosen by
    the predictive's NLL on the ``eval_dataset`` after training
    (``Laplace.optimize_prior_precision(method="gridsearch", relative=True)``), or ``k = inf``
    (the MAP's predictive) where that NLL is lowest without any posterior variance
    (:func:`~hf_marglik.tuning.tune_predictive_prior`); saved as
    ``laplace.predictive_prior_precision`` beside the learned ``prior_precision``."""
