"""Curvature gathered during the training epoch ("online" K-FAC, as K-FAC optimisers do it).

A separate curvature pass over the training data costs about one epoch (a forward and a
backward per batch). Online, the layer inputs are read from the training forward passes that
run anyway, and the output-gradient factors come from one extra backward of Monte-Carlo-sampled
labels on the same graph (``retain_graph``), on every ``every``-th optimizer step: no extra
forward and no data loading. The training backward then runs on the same graph as usual.

What differs from a pass at the update (measured in BENCHMARKS.md, "Online curvature"):

- the factors mix the parameters of the whole window since the last update (a K-FAC
  optimiser's factors do too) instead of being taken at the update's parameters;
- the forward passes run in train mode, so dropout is on: an input ``ã = m ⊙ a / (1 − p)``
  after dropout has ``E[ããᵀ] = aaᵀ + p/(1 − p)·diag(a²)``, which inflates the diagonal of the
  input factor of a layer right after a dropout (LoRA's ``lora_dropout``), and the sampled
  labels follow the dropped-out logits;
- the loss ``Σ ℓ`` of the log likelihood term is the training loss of the sampled steps,
  rescaled to the data count ``N``, not the loss at the update's parameters. It does not move
  the prior precision (only the noise, for regression) but enters the comparison of updates for
  the best model.

The counts are rescaled as for a curvature subset: the curvature and the loss of the sampled
data points times ``N / counted``. Gradient accumulation: every micro-batch of a sampled step
adds. Data-parallel runs sum over processes at the update.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.distributed as dist
from torch import Tensor

from . import batches as B
from .columns import loss_columns
from .curvature import Curvature, CurvatureSettings, FitResult, LinearSite, Recorder
from .draws import LabelDraws, derive_seed
from .options import Backend

EXTRA_BACKWARD_COST = 2.0 / 3.0
"""The cost of one extra backward pass relative to one training step (a forward and a
backward; a backward costs about two forwards): the rule that turns a compute budget into the
sampling interval ``every`` (:func:`interval_for_budget`)."""


DEFAULT_BUDGET = 0.25
"""The default ``marglik_budget``: an extra backward on every 3rd step (2/9 of the training
compute)."""


def interval_for_budget(budget: float) -> int:
    """The sampling interval whose extra backward passes cost at most ``budget`` (a fraction of
    the training compute): ``ceil(EXTRA_BACKWARD_COST / budget)``."""
    if not 0 < budget <= 1:
        raise ValueError(f"marglik_budget={budget} must lie in (0, 1].")
    return max(1, math.ceil(EXTRA_BACKWARD_COST / budget - 1e-9))


class OnlineCurvature:
    """Accumulates K-FAC (or diag / full) curvature from training steps; see the module
    docstring.

    Args:
        params: the trainable tensors.
        sites: their linear layers (:func:`~hf_marglik.curvature.linear_sites`).
        settings: the curvature's structure, backend (``"ggn-mc"``: one sampled label per
            data point and ``n_mc_samples``; ``"ef"``: the observed label), K-FAC variant and
            batch keys.
        every: sample every ``every``-th optimizer step.
        seed: seed of the Monte-Carlo labels; with the step and each example's hash it keys
            them (:mod:`hf_marglik.draws`), so that they do not depend on the number of
            data-parallel processes or the batching.
    """

    def __init__(
        self,
        params: list[Tensor],
        sites: list[LinearSite],
        settings: CurvatureSettings,
        dtype: torch.dtype,
        device: torch.device,
        every: int = 1,
        seed: int = 0,
    ):
        self.params, self.sites, self.settings = params, sites, settings
        self.dtype, self.device, self.every = dtype, device, int(every)
        self.seed = int(seed)
        self.reset()

    @classmethod
    def for_laplace(cls, lap, every: int, seed: int) -> OnlineCurvature:
        """The online curvature of ``lap``'s parameters, layers and settings (an unfitted
        :class:`~hf_marglik.Laplace` built with the run's hyperparameters)."""
        return cls(
            lap.params, lap.sites, lap.curvature_settings, lap.dtype, lap.device, every, seed
        )

    def update_fit(self, pass_fit, window_fit, when: str):
        """The fit an update uses: ``window_fit`` (from this window's curvature), or, with a
        warning, ``pass_fit`` (a curvature pass) when the window sampled no step (an interval
        longer than the window). ``when`` names the update in the warning."""
        if not self.empty:
            return window_fit
        warnings.warn(
            f"The online curvature sampled no step before the update {when} (every "
            f"{self.every} steps): this update makes a curvature pass. Raise marglik_budget "
            "or update less often.",
            UserWarning,
            stacklevel=3,
        )
        return pass_fit

    def reset(self) -> None:
        """Start a new window (after an update)."""
        s = self.settings
        sizes = [p.numel() for p in self.params]
        self.curvature = Curvature(
            self.sites, sizes, s.structure, s.kfac_approx, self.dtype, self.device, s.factor_rank
        )
        self.loss = torch.zeros((), dtype=self.dtype, device=self.device)
        self.counted = 0.0
        self.n_outputs: int | None = None

    @property
    def empty(self) -> bool:
        return self.counted == 0

    def due(self, global_step: int) -> bool:
        """Whether the optimizer step that follows ``global_step`` is sampled."""
        return (global_step + 1) % self.every == 0

    @contextlib.contextmanager
    def recording(self, model):
        """Record the sites' inputs in the forward pass inside the block (and the output
        gradients of :meth:`add`'s backward)."""
        rec = Recorder(self.sites, self.dtype)
        with rec.recording(model):
            yield rec

    def add(
        self,
        rec: Recorder,
        t: B.Targets,
        attention_mask: Tensor | None,
        x: Tensor,
        step: int,
    ) -> None:
        """Add one micro-batch: its recorded inputs, its loss, and the output gradients of
        backward passes of sampled labels through ``t.logits`` (the graph is kept for the
        training backward). ``x``: the micro-batch's main input (``dict_key_x``), whose hash
        per example keys the sampled labels with the seed and the optimizer ``step``."""
        acts = rec.inputs()
        self.curvature.add_inputs(acts, attention_mask)
        self.loss += B.nll_sum(t).detach().to(self.dtype)
        self.counted += t.n_data
        self.n_outputs = int(t.logits.shape[-1])
        s = self.settings
        draws = None
        if s.backend == Backend.GGN_MC:
            seed = derive_seed(self.seed, step)
            draws = LabelDraws.for_batch(seed, x, attention_mask, s.likelihood)
        for col in loss_columns(t, s.backend, s.n_mc_samples, draws):
            torch.autograd.grad(
                t.logits,
                self.params,
                grad_outputs=col.to(t.logits.dtype),
                retain_graph=True,
                allow_unused=True,
            )
            self.curvature.add(acts, rec.output_grads(acts), attention_mask)

    def result(self, n_data: int) -> FitResult:
        """The window's curvature and loss rescaled to ``n_data`` data points, summed over
        data-parallel processes."""
        counted, n_outputs = self.counted, self.n_outputs
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.curvature.all_reduce()
            dist.all_reduce(self.loss)
            total = torch.tensor(  # on the model's device: NCCL reduces CUDA tensors only
                [float(counted), float(n_outputs or -1)], dtype=torch.float64, device=self.device
            )
            dist.all_reduce(total[:1])
            dist.all_reduce(total[1:], op=dist.ReduceOp.MAX)
            counted, n_outputs = float(total[0]), int(total[1])
        if counted == 0:
            raise ValueError("The online curvature window holds no data points.")
        scale = n_data / counted
        return FitResult(self.curvature.posterior(scale), self.loss * scale, n_data, n_outputs)

    def state_dict(self) -> dict:
        return {
            "curvature": self.curvature.state_dict(),
            "loss": self.loss.clone(),
            "counted": self.counted,
            "n_outputs": self.n_outputs,
            "seed": self.seed,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.reset()
        self.curvature.load_state_dict(sd["curvature"])
        self.loss.copy_(sd["loss"])
        self.counted, self.n_outputs = sd["counted"], sd["n_outputs"]
        self.seed = int(sd.get("seed", self.seed))  # older states held a generator instead
