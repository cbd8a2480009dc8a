"""Post-hoc tuning of the prior precision of a fitted :class:`~hf_marglik.Laplace`, with
laplace-torch's ``optimize_prior_precision`` arguments.

``method="marglik"``: Adam on the log prior precision, ``n_steps`` steps at ``lr`` on the
negative log marginal likelihood, starting from ``init_prior_prec`` laid out as
``prior_structure`` (laplace-torch's protocol, and Laplace-LoRA's).

``method="gridsearch"``: the prior precision from ``logspace(log_prior_prec_min,
log_prior_prec_max, grid_size, base)`` with the lowest predictive loss on ``val_loader``
(default: the mean negative log likelihood of the targets; for regression the Gaussian NLL of
the predictive ``N(f*, J Σ Jᵀ + σ²)``, where laplace-torch's default MSE of the mean would not
depend on the prior for the GLM predictive). As in laplace-torch the grid values are scalar
precisions; ``relative=True`` (an hf_marglik extension) multiplies the *current* precisions by
them instead, which keeps a learned layerwise structure.

For ``pred_type="glm"`` the validation Jacobians are computed once, in one pass, and every grid
value reuses them: a grid of 100 costs one Jacobian pass plus 100 cheap covariance evaluations,
not 100 passes. ``pred_type="nn"`` needs model calls per grid value and sample.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import batches as B
from .options import Likelihood, LinkApprox, PredType, PriorStructure, TuningMethod, coerce
from .parallel import sum_over_processes as _sum_over_processes
from .prior import Prior


def optimize_prior_precision(
    lap,
    pred_type="glm",
    method="marglik",
    n_steps: int = 100,
    lr: float = 1e-1,
    init_prior_prec: float | Tensor = 1.0,
    prior_structure=None,
    val_loader=None,
    loss: Callable | None = None,
    log_prior_prec_min: float = -4,
    log_prior_prec_max: float = 4,
    grid_size: int = 100,
    link_approx="probit",
    n_samples: int = 100,
    verbose: bool = False,
    progress_bar: bool = False,
    log_prior_prec_base: float = 10.0,
    relative: bool = False,
) -> None:
    """Set ``lap.prior_precision`` by ``method`` (see the module docstring).

    ``loss(prediction, y)`` (gridsearch): a callable of what ``lap(x, pred_type, ...)`` returns
    for a batch (class probabilities, or ``(mean, covariance)`` for regression) and the
    batch's targets, giving a per-batch sum; the grid value with the lowest total wins.
    ``prior_structure`` (marglik): the layout of a float ``init_prior_prec``, by default
    ``"scalar"`` (laplace-torch's); a tensor ``init_prior_prec`` keeps its own layout.
    """
    pred_type = coerce(PredType, pred_type, "pred_type")
    link_approx = coerce(LinkApprox, link_approx, "link_approx")
    method = coerce(TuningMethod, method, "method")
    lap.check_fitted()
    lap.predictive_prior_precision = None  # the tuned prior_precision is the predictive's too
    if method == TuningMethod.MARGLIK:
        if val_loader is not None:
            warnings.warn(
                "val_loader is ignored with method='marglik'; did you mean method='gridsearch'?",
                UserWarning,
                stacklevel=3,
            )
        _by_marglik(lap, n_steps, lr, init_prior_prec, prior_structure, progress_bar)
    else:
        if val_loader is None:
            raise ValueError(
                "method='gridsearch' picks the prior precision by the predictive's loss on "
                "validation data: pass val_loader=<a DataLoader of (inputs, targets) batches>."
            )
        if grid_size < 1:
            raise ValueError(f"grid_size={grid_size} must be at least 1.")
        grid = torch.logspace(
            log_prior_prec_min, log_prior_prec_max, grid_size, base=log_prior_prec_base
        ).to(lap.dtype)
        _by_gridsearch(
            lap, grid, val_loader, pred_type, link_approx, n_samples, loss, relative, progress_bar
        )
    if verbose:
        print(f"Optimized prior precision is {lap.prior_precision}.")


def tune_predictive_prior(
    lap,
    val_loader,
    pred_type="glm",
    link_approx="probit",
    n_samples: int = 100,
    *,
    sum_over_processes: bool = False,
) -> float:
    """``predictive_prior='gridsearch'`` of the trainers: the learned precisions times the
    factor (of the default grid, ``relative=True``) with the lowest predictive NLL on
    ``val_loader``, stored as ``lap.predictive_prior_precision``; ``lap.prior_precision`` stays
    the learned one. The predictive is over ``lap.predictive_subset_of_weights``. Returns the
    mean factor.

    Where the predictive tends to the MAP's as the variance vanishes (``pred_type="nn"``, and
    ``"glm"`` with the ``probit`` or ``mc`` link), the MAP is a candidate too, the grid's limit:
    if its NLL on ``val_loader`` is at most the best grid value's, the predictive prior is
    ``inf`` everywhere (:attr:`~hf_marglik.prior.Prior.is_point_mass`), the predictive is the
    MAP's to the last digit without Jacobians or samples, and the factor returned is ``inf``.
    The Laplace bridge's limit is not the MAP's (it is invariant to the covariance's scale), so
    it has no such candidate.

    ``sum_over_processes``: ``val_loader`` is this process's shard of the validation data (the
    Trainer's data-parallel evaluation); every candidate's loss is summed over the processes of
    the ``torch.distributed`` group before the choice, so that all choose the same prior, the
    one of the whole split. Every process of the group must call it then."""
    pred_type = coerce(PredType, pred_type, "pred_type")
    link_approx = coerce(LinkApprox, link_approx, "link_approx")
    lap.check_fitted()
    learned = lap.prior_precision.clone()
    lap.predictive_prior_precision = None
    grid = torch.logspace(-4, 4, 100).to(lap.dtype)  # optimize_prior_precision's default grid
    reduce = _sum_over_processes if sum_over_processes else None
    best = _by_gridsearch(
        lap, grid, val_loader, pred_type, link_approx, n_samples, None, True, False, reduce
    )
    tuned = lap.prior_precision.clone()
    lap.prior_precision = learned
    if pred_type == PredType.NN or link_approx in (LinkApprox.PROBIT, LinkApprox.MC):
        map_loss = torch.tensor([_map_loss(lap, val_loader, _default_loss(lap))])
        if float((reduce(map_loss) if reduce else map_loss)[0]) <= best:
            tuned = torch.full_like(learned, math.inf)
    lap.predictive_prior_precision = tuned
    return float((tuned / learned).mean())


def _by_marglik(lap, n_steps, lr, init_prior_prec, prior_structure, progress_bar) -> None:
    init = torch.as_tensor(init_prior_prec, dtype=lap.dtype, device=lap.device).reshape(-1)
    if init.numel() == 1 and not isinstance(init_prior_prec, Tensor):
        structure = coerce(PriorStructure, prior_structure or "scalar", "prior_structure")
        init = init.expand(Prior.size(structure, lap.sizes)).clone()
    Prior(init, lap.sizes)  # a length that fits no structure is a ValueError
    log_prec = init.log().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([log_prec], lr=lr)
    for _ in tqdm(
        range(n_steps), desc="[Optimizing marginal likelihood]", disable=not progress_bar
    ):
        optimizer.zero_grad()
        neg = -lap.log_marginal_likelihood(prior_precision=log_prec.exp())
        neg.backward()
        optimizer.step()
    lap.prior_precision = log_prec.detach().exp()


def _by_gridsearch(
    lap,
    grid,
    val_loader,
    pred_type,
    link_approx,
    n_samples,
    loss,
    relative,
    progress_bar,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> float:
    """Set ``lap.prior_precision`` to the grid value (times the current precisions with
    ``relative``) of the lowest total ``loss`` on ``val_loader``, and return that total.
    ``reduce``: applied to the totals of all grid values before the choice (their sums over
    processes)."""
    base = lap.prior_precision.clone() if relative else torch.ones(1, dtype=lap.dtype)
    loss = loss or _default_loss(lap)
    # a grid value scales the base: the priors of the grid are isotropic per tensor iff it is
    isotropic = lap.prior.isotropic_per_tensor if relative else True
    cached = _ValidationCache(lap, val_loader, isotropic) if pred_type == PredType.GLM else None
    generator = torch.Generator(device=lap.device)
    results: list[float] = []
    for value in tqdm(grid, desc="[Grid search]", disable=not progress_bar):
        lap.prior_precision = base.to(lap.device) * value
        generator.manual_seed(0)  # the same Monte-Carlo draws for every grid value
        try:
            if cached is not None:
                total = cached.loss(loss, link_approx, n_samples, generator)
            else:
                total = _loss_by_calls(lap, val_loader, pred_type, link_approx, n_samples, loss)
        except torch.linalg.LinAlgError:  # a precision too small to factorise
            total = math.inf
        results.append(total if math.isfinite(total) else math.inf)
    if reduce is not None:
        results = reduce(torch.tensor(results, dtype=torch.float64)).tolist()
    if all(r == math.inf for r in results):
        raise ValueError("gridsearch: the predictive loss is not finite at any grid value.")
    best = int(torch.tensor(results).argmin())
    lap.prior_precision = base.to(lap.device) * grid[best]
    return results[best]


class _ValidationCache:
    """The validation batches' logits, Jacobians and targets, computed once."""

    def __init__(self, lap, val_loader, isotropic: bool):
        from .predictive import glm_covariance_fn, glm_jacobians

        self.lap = lap
        self.batches = []
        for batch in val_loader:
            inputs, y = _split(lap, batch)
            logits, jac = glm_jacobians(lap, inputs)  # over predictive_subset_of_weights
            # the Jacobians rotated once; a grid value only rescales (glm_covariance_fn)
            covariance = glm_covariance_fn(lap, jac, *logits.shape, isotropic=isotropic)
            self.batches.append((logits, covariance, y))

    def loss(self, loss, link_approx, n_samples, generator) -> float:
        from .predictive import categorical

        lap, total = self.lap, 0.0
        for logits, covariance, y in self.batches:
            cov = covariance()
            if lap.likelihood == Likelihood.REGRESSION:
                pred = (logits, cov)
            else:
                pred = categorical(logits, cov, link_approx, n_samples, generator)
            total += float(loss(pred, y))
        return total


def _map_loss(lap, val_loader, loss) -> float:
    """The loss of the MAP's predictive on ``val_loader``: the softmax of its outputs, or for
    regression ``N(f*, σ²)`` (zero function variance)."""
    from .predictive import map_outputs

    total = 0.0
    for batch in val_loader:
        inputs, y = _split(lap, batch)
        f = map_outputs(lap, inputs)
        if lap.likelihood == Likelihood.REGRESSION:
            pred = (f, torch.zeros(*f.shape, f.shape[-1], dtype=f.dtype, device=f.device))
        else:
            pred = torch.softmax(f, dim=-1)
        total += float(loss(pred, y))
    return total


def _loss_by_calls(lap, val_loader, pred_type, link_approx, n_samples, loss) -> float:
    total = 0.0
    for batch in val_loader:
        inputs, y = _split(lap, batch)
        total += float(
            loss(lap(inputs, pred_type, link_approx=link_approx, n_samples=n_samples), y)
        )
    return total


def _split(lap, batch):
    try:
        inputs, y = B.split_batch(batch, lap.dict_key_x, lap.dict_key_y)
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"gridsearch needs validation batches with targets: {err.args[0]}"
        ) from None
    return inputs, B.to_device(y, lap.device)


def _default_loss(lap) -> Callable:
    """Summed negative log likelihood of the targets under the predictive."""
    if lap.likelihood == Likelihood.REGRESSION:
        sigma2 = float(lap.sigma_noise) ** 2

        def gaussian_nll(pred, y) -> Tensor:
            mean, cov = pred
            var = torch.diagonal(cov, dim1=1, dim2=2) + sigma2
            y = y.reshape(mean.shape).to(mean.dtype)
            return 0.5 * (torch.log(2 * math.pi * var) + (y - mean) ** 2 / var).sum()

        return gaussian_nll

    def nll(probs, y) -> Tensor:
        keep = y != B.IGNORE_INDEX
        p = probs[keep].gather(-1, y[keep].long().unsqueeze(-1)).squeeze(-1)
        return -torch.log(p.clamp_min(1e-12)).sum()

    return nll
