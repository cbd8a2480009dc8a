"""GGN / Fisher curvature over the trainable ``nn.Linear`` parameters, on ASDL's hooks.

This is the only module that touches ASDL (``asdl``, PyPI ``asdfghjkl==0.1a4``). ASDL records,
for every trainable linear layer, its inputs ``a`` in the forward pass and the gradients ``g`` of
the backpropagated vector with respect to its outputs in each backward pass
(``asdl.save_inputs_outgrads``). The curvature is assembled here from those, so that the
conventions are ours and checked against dense references (see tests/):

* One backward pass per *column* ``s`` of a square root of the loss Hessian,
  ``Λ = Σ_s s sᵀ`` (exact GGN: ``s_c = √p_c (e_c − p)`` for softmax cross-entropy, ``e_c`` for
  squared error; Monte-Carlo GGN: ``s = p − e_ŷ`` with ``ŷ`` sampled from the model; empirical
  Fisher: the gradient at the observed target). Positions that are not data are zero in every
  column.
* A weight ``W`` (``d_out × d_in``, flattened row-major) has the per-example gradient
  ``Σ_t g_t a_tᵀ``; its K-FAC block is ``B ⊗ A``:
  expand — ``A = mean_{positions} a aᵀ``, ``B = Σ_{positions} g gᵀ``;
  reduce — ``â = mean_t a_t`` and ``ĝ = Σ_t g_t`` per sequence, ``A = mean_n â âᵀ``,
  ``B = Σ_n ĝ ĝᵀ`` (Eschenhagen et al., NeurIPS 2023). A bias has the dense block ``B``.
  Padded positions (``attention_mask == 0``) never enter ``A``.
* ``full`` and ``diag`` use the exact per-example gradients.

ASDL's own Fisher makers are not used: they add into ``.grad``, leave ``fisher`` attributes that
crash peft's ``ModulesToSaveWrapper`` on a second call, sum ``A`` over tokens, ignore index -1
rather than -100 and sample targets at padded positions (see NOTES.md).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import asdl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import batches as B
from .columns import check_outputs, loss_columns, per_position
from .factors import DenseFactor, SketchedFactor, new_factor
from .options import Backend, HessianStructure, KFACApprox, Likelihood
from .posterior import DiagPosterior, EigFactor, FullPosterior, KronPosterior, Posterior


@dataclass
class LinearSite:
    """A linear layer with trainable parameters; indices into the trainable-parameter list."""

    name: str
    module: nn.Linear
    weight_index: int | None
    bias_index: int | None


def linear_sites(model: nn.Module, params: list[tuple[str, nn.Parameter]]) -> list[LinearSite]:
    """The linear layers that hold the trainable parameters; a clear error for any other owner."""
    index = {id(p): i for i, (_, p) in enumerate(params)}
    names = {id(p): n for n, p in params}
    sites, covered = [], set()
    for mname, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in index]
        if not own:
            continue
        if type(module) is not nn.Linear and not isinstance(module, nn.Linear):
            bad = ", ".join(names[id(p)] for p in own)
            raise ValueError(
                f"Trainable parameter(s) {bad} belong to a {type(module).__name__}; hf_marglik's "
                "curvature covers nn.Linear layers only (LoRA A/B, classification heads). Freeze "
                "them (requires_grad=False) or leave that module out of modules_to_save."
            )
        w, b = module.weight, module.bias
        wi = index.get(id(w))
        bi = index.get(id(b)) if b is not None else None
        if wi is None and bi is not None:
            raise ValueError(
                f"{mname}.bias is trainable while {mname}.weight is frozen; hf_marglik's curvature "
                "needs the weight of a linear layer trainable whenever its bias is."
            )
        sites.append(LinearSite(mname, module, wi, bi))
        covered.update(i for i in (wi, bi) if i is not None)
    missing = [n for i, (n, _) in enumerate(params) if i not in covered]
    if missing:
        raise ValueError(f"Trainable parameters not owned by any module: {missing}.")
    return sites


class Recorder:
    """Records the inputs and output gradients of the sites through ASDL's hooks."""

    def __init__(self, sites: list[LinearSite], dtype: torch.dtype):
        self.sites, self.dtype = sites, dtype
        self._cxt = None

    @contextlib.contextmanager
    def recording(self, model: nn.Module):
        """Record inputs and output gradients of the sites (ASDL hooks) inside the block."""
        with warnings.catch_warnings():
            # ASDL registers module backward hooks of the pre-full kind; their grad_output (all
            # that is read here) is correct, the deprecation warning is noise for users.
            warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
            warnings.filterwarnings("ignore", message=".*backward hook.*deprecated.*")
            with asdl.save_inputs_outgrads(model, targets=[s.module for s in self.sites]) as cxt:
                self._cxt, self.model = cxt, model
                try:
                    yield self
                finally:
                    self._cxt = None

    def inputs(self) -> list[Tensor]:
        """Inputs of each site in the last forward pass (popped from ASDL's record)."""
        out = []
        for s in self.sites:
            recorded = self._cxt.in_data(s.module, pop=True)
            if not recorded:
                raise RuntimeError(f"Layer {s.name!r} was not called in the forward pass.")
            if len(recorded) > 1:
                raise ValueError(
                    f"Layer {s.name!r} was called {len(recorded)} times in one forward pass; "
                    "weight sharing across calls is not supported by hf_marglik's curvature."
                )
            out.append(recorded[0].to(self.dtype))
        return out

    def output_grads(self, inputs: list[Tensor]) -> list[Tensor]:
        """Output gradients of each site in the last backward pass, shaped like its inputs."""
        out = []
        for s, a in zip(self.sites, inputs):
            recorded = self._cxt.out_grads(s.module, pop=True)
            if recorded is None or len(recorded) != 1:
                n = 0 if recorded is None else len(recorded)
                raise RuntimeError(f"Layer {s.name!r} saw {n} backward passes, expected 1.")
            g = recorded[0].to(self.dtype)
            out.append(g.reshape(*a.shape[:-1], g.shape[-1]))
        return out


class Curvature:
    """Accumulates the curvature of one fit, batch by batch.

    K-FAC: ``B[i]`` (``Σ g gᵀ``) per site; input factors ``Σ a aᵀ`` in ``inputs``, site ``i``
    using ``inputs[a_of[i]]``: sites that read the very same input tensor (LoRA ``A`` of
    ``q_proj`` and ``v_proj``) share one accumulator, which is then decomposed once.
    """

    def __init__(
        self,
        sites: list[LinearSite],
        sizes: list[int],
        structure: HessianStructure,
        kfac_approx: KFACApprox,
        dtype: torch.dtype,
        device: torch.device,
        factor_rank: int | None = None,
    ):
        self.sites, self.sizes, self.structure = sites, sizes, structure
        self.kfac_approx, self.factor_rank = kfac_approx, factor_rank
        self.dtype, self.device = dtype, device
        n = sum(sizes)
        if structure == HessianStructure.FULL:
            self.H = torch.zeros(n, n, dtype=dtype, device=device)
        elif structure == HessianStructure.DIAG:
            self.H = torch.zeros(n, dtype=dtype, device=device)
        else:
            self.inputs: list[DenseFactor | SketchedFactor] = []  # Σ a aᵀ, possibly shared
            self.a_of: dict[int, int] = {}  # site -> index into inputs
            self.B: dict[int, DenseFactor | SketchedFactor] = {}  # site -> Σ g gᵀ

    def add(self, inputs: list[Tensor], grads: list[Tensor], mask: Tensor | None) -> None:
        """Add one column's contribution (all examples of the batch)."""
        if self.structure == HessianStructure.KRON:
            for i, (a, g) in enumerate(zip(inputs, grads)):
                self._add_kron(i, a, g, mask)
            return
        per_example = self._per_example_grads(inputs, grads)
        if self.structure == HessianStructure.FULL:
            self.H.addmm_(per_example.T, per_example)
        else:
            self.H.add_((per_example * per_example).sum(0))

    def add_inputs(
        self, inputs: list[Tensor], mask: Tensor | None, weights: Tensor | None = None
    ) -> None:
        """Add the input factors of one forward pass (K-FAC only; once per batch); ``weights``:
        one per example, example ``n``'s rows count ``w_n`` times.

        Sites whose inputs are the same tensor share one accumulator. Should a later batch feed
        them different inputs, the shared accumulator is split first (each keeps the sum so far).
        """
        if self.structure != HessianStructure.KRON:
            return
        keys = {
            i: (a.data_ptr(), tuple(a.shape), tuple(a.stride()), a.dtype)
            for i, (s, a) in enumerate(zip(self.sites, inputs))
            if s.weight_index is not None
        }
        for i in keys:
            shared = [j for j in keys if j < i and self.a_of.get(j, -1) == self.a_of.get(i, -2)]
            if any(keys[j] != keys[i] for j in shared):
                self.a_of[i] = len(self.inputs)
                self.inputs.append(copy.deepcopy(self.inputs[self.a_of[shared[0]]]))
        first: dict[tuple, int] = {}
        done: set[int] = set()
        for i, key in keys.items():
            if i not in self.a_of:
                j = first.get(key)
                if j is not None:
                    self.a_of[i] = self.a_of[j]
                else:
                    self.a_of[i] = len(self.inputs)
                    self.inputs.append(self._factor(inputs[i].shape[-1], 2 * i))
            first.setdefault(key, i)
            if self.a_of[i] in done:
                continue
            rows, count = self._input_rows(inputs[i], mask, weights)
            factor = self.inputs[self.a_of[i]]
            factor.add(rows)
            factor.count += count
            done.add(self.a_of[i])

    def _factor(self, d: int, key: int) -> DenseFactor | SketchedFactor:
        # the sketch's random test matrix depends only on the factor: the same on every process
        return new_factor(d, self.factor_rank, 7919 + key, self.dtype, self.device)

    def _input_rows(
        self, a: Tensor, mask: Tensor | None, weights: Tensor | None = None
    ) -> tuple[Tensor, float]:
        """The rows whose outer products make up ``A``, and their (weighted) count."""
        w = None if weights is None else weights.to(a.device, a.dtype).reshape(-1)
        if a.ndim == 2:
            if w is None:
                return a, a.shape[0]
            return a * w.sqrt().unsqueeze(-1), float(w.sum())
        a3 = a.reshape(a.shape[0], -1, a.shape[-1])
        m = _position_mask(mask, a3)
        if self.kfac_approx == KFACApprox.EXPAND:
            if w is not None:
                a3 = a3 * w.sqrt().reshape(-1, 1, 1)
                wt = w.reshape(-1, 1).expand(a3.shape[:2])
                count = float(wt[m].sum()) if m is not None else float(wt.sum())
            rows = a3[m] if m is not None else a3.reshape(-1, a3.shape[-1])
            return rows, (rows.shape[0] if w is None else count)
        if m is None:
            rows = a3.mean(1)
        else:
            mw = m.to(a3.dtype).unsqueeze(-1)
            rows = (a3 * mw).sum(1) / mw.sum(1).clamp_min(1.0)
        if w is None:
            return rows, a3.shape[0]
        return rows * w.sqrt().unsqueeze(-1), float(w.sum())

    def _add_kron(self, i: int, a: Tensor, g: Tensor, mask: Tensor | None) -> None:
        g2 = (
            g.reshape(-1, g.shape[-1])
            if a.ndim == 2 or self.kfac_approx == KFACApprox.EXPAND
            else None
        )
        if g2 is None:
            g2 = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
        if i not in self.B:
            self.B[i] = self._factor(g2.shape[1], 2 * i + 1)
        self.B[i].add(g2)

    def _per_example_grads(self, inputs: list[Tensor], grads: list[Tensor]) -> Tensor:
        return torch.cat(per_example_grads(self.sites, len(self.sizes), inputs, grads), dim=1)

    def all_reduce(self) -> None:
        """Sum the accumulated curvature over the processes of a ``torch.distributed`` group
        (data-parallel fits: each process saw its shard)."""
        if not _distributed():
            return
        if self.structure != HessianStructure.KRON:
            dist.all_reduce(self.H)
            return
        for i in sorted(self.B):
            self.B[i].all_reduce()
        for factor in self.inputs:
            factor.all_reduce()
            count = torch.tensor(float(factor.count), dtype=torch.float64, device=self.device)
            dist.all_reduce(count)
            factor.count = float(count.item())

    def posterior(self, scale: float = 1.0) -> Posterior:
        """The fitted curvature ``scale · H`` in its structure's posterior form."""
        if self.structure == HessianStructure.FULL:
            H = self.H * scale
            return FullPosterior(self.sizes, 0.5 * (H + H.T))
        if self.structure == HessianStructure.DIAG:
            return DiagPosterior(self.sizes, self.H * scale)
        sides = [_side(f) for f in [*self.inputs, *self.B.values()]]
        with _one_thread(self.device.type == "cpu" and max(sides, default=0) <= ONE_THREAD_EIGH):
            return self._kron_posterior(scale)

    def _kron_posterior(self, scale: float) -> KronPosterior:
        """Eigendecompositions of ``B = scale · Σ g gᵀ`` per site and ``A = mean a aᵀ`` per input
        accumulator; negative eigenvalues (rounding) are clipped to 0 and counted."""
        factors: list[EigFactor] = []
        clipped = 0

        def add(lam: Tensor, Q: Tensor, n_neg: int) -> int:
            nonlocal clipped
            clipped += n_neg
            factors.append(EigFactor(lam, Q))
            return len(factors) - 1

        a_index = {}  # input accumulator -> factor index (decomposed once)
        blocks: list[tuple | None] = [None] * len(self.sizes)
        for i, s in enumerate(self.sites):
            b = add(*self.B[i].eig(scale))
            if s.weight_index is not None:
                k = self.a_of[i]
                if k not in a_index:
                    acc = self.inputs[k]
                    a_index[k] = add(*acc.eig(1.0 / max(acc.count, 1)))
                blocks[s.weight_index] = (b, a_index[k])
            if s.bias_index is not None:
                blocks[s.bias_index] = (b, None)
        post = KronPosterior(self.sizes, factors, blocks)
        post.n_clipped = clipped
        return post


ONE_THREAD_EIGH = 1024
"""CPU factors up to this side are decomposed with one thread: threads gain nothing there, and
on a loaded machine two OpenMP threads stall (``torch.linalg.eigh`` of a 384 × 384 factor took
a median 4 s with 2 threads against 8 ms with 1 at load average 3; BENCHMARKS.md, quick run)."""


def _side(factor) -> int:
    M = getattr(factor, "M", None)
    return int(M.shape[0]) if M is not None else int(factor.d)


@contextlib.contextmanager
def _one_thread(active: bool):
    threads = torch.get_num_threads()
    if active and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def per_example_grads(
    sites: list[LinearSite], n_tensors: int, inputs: list[Tensor], grads: list[Tensor]
) -> list[Tensor]:
    """Per-example gradients ``(n, numel)`` of each trainable tensor, in parameter order: a weight
    gets ``Σ_t g_t a_tᵀ`` (flattened row-major), a bias ``Σ_t g_t``."""
    chunks: list[Tensor | None] = [None] * n_tensors
    for s, a, g in zip(sites, inputs, grads):
        n = a.shape[0]
        a3 = a.reshape(n, -1, a.shape[-1])
        g3 = g.reshape(n, -1, g.shape[-1])
        if s.weight_index is not None:
            chunks[s.weight_index] = torch.einsum("nto,nti->noi", g3, a3).reshape(n, -1)
        if s.bias_index is not None:
            chunks[s.bias_index] = g3.sum(1)
    return chunks


def _position_mask(mask: Tensor | None, a3: Tensor) -> Tensor | None:
    if mask is None or mask.ndim != 2 or tuple(mask.shape) != tuple(a3.shape[:2]):
        return None
    return mask.bool()


# ---------------------------------------------------------------------------- the data pass
@dataclass
class FitResult:
    """What one pass over the data gives: the posterior's curvature, the summed loss (at unit
    noise), the data count and the number of outputs per data point."""

    posterior: Posterior
    loss: Tensor
    n_data: int
    n_outputs: int | None


@dataclass
class CurvatureSettings:
    """How the curvature of a fit is computed (the options of :class:`~hf_marglik.Laplace`)."""

    likelihood: Likelihood
    structure: HessianStructure
    backend: Backend
    kfac_approx: KFACApprox
    dict_key_x: str
    dict_key_y: str
    n_mc_samples: int = 1
    factor_rank: int | None = None


def fit_curvature(
    model: nn.Module,
    loader,
    params: list[Tensor],
    sites: list[LinearSite],
    settings: CurvatureSettings,
    *,
    dtype: torch.dtype,
    device: torch.device,
    n_data: int | None = None,
    generator: torch.Generator | None = None,
    example_weights=None,
    progress_bar: bool = False,
) -> FitResult:
    """One pass over ``loader`` in eval mode: the loss and the curvature at the current
    parameters, summed over data-parallel processes. ``n_data`` (the data points of the whole
    training set when ``loader`` covers a subset) rescales both by ``n_data / counted``;
    ``example_weights(batch)`` gives one weight per example (see ``Laplace.fit``). The model's
    train/eval mode, ``requires_grad`` flags and ``.grad`` are restored, also when it raises."""
    sizes = [p.numel() for p in params]
    curv = Curvature(
        sites, sizes, settings.structure, settings.kfac_approx, dtype, device, settings.factor_rank
    )
    loss = torch.zeros((), dtype=dtype, device=device)
    counted, n_outputs = 0.0, None
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.eval()
    try:
        rec = Recorder(sites, dtype)
        with rec.recording(model):
            for batch in tqdm(loader, desc="Curvature fit", disable=not progress_bar):
                w = None if example_weights is None else example_weights(batch)
                n, k = _fit_batch(rec, curv, batch, params, settings, generator, loss, w, device)
                counted, n_outputs = counted + n, k
    finally:
        model.train(was_training)
        for p, flag, g in zip(model.parameters(), flags, grads):
            p.requires_grad_(flag)
            p.grad = g
    if _distributed():
        curv.all_reduce()
        dist.all_reduce(loss)
        total = torch.tensor(float(counted), dtype=torch.float64, device=device)
        dist.all_reduce(total)
        counted = float(total.item())
        n_outputs = _max_over_processes(n_outputs, device)  # a process may have no batch
    if counted == 0:
        raise ValueError("The data has no data points (all targets are -100 or empty).")
    scale = 1.0 if n_data is None else n_data / counted
    return FitResult(
        curv.posterior(scale),
        loss * scale,
        round(counted) if n_data is None else int(n_data),
        n_outputs,
    )


def _fit_batch(rec, curv, batch, params, settings, generator, loss, w, device):
    inputs, y = B.split_batch(batch, settings.dict_key_x, settings.dict_key_y)
    inputs, y = B.to_device(inputs, device), B.to_device(y, device)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    with torch.enable_grad():
        logits = B.call_model(rec.model, inputs, settings.dict_key_x)
        t = B.targets_for(logits, y, settings.likelihood, mask)
        if settings.likelihood != Likelihood.REGRESSION:
            check_outputs(logits.shape[-1], settings.backend)
        wp = None if w is None else _point_weights(w, t, curv.dtype)
        loss += B.nll_sum(t, wp).detach().to(curv.dtype)
        acts = rec.inputs()
        curv.add_inputs(acts, mask, w)
        cols = loss_columns(t, settings.backend, settings.n_mc_samples, generator)
        if settings.likelihood == Likelihood.CAUSAL_LM and settings.backend != Backend.GGN_MC:
            # each token is its own data point: its loss-Hessian columns are backpropagated
            # alone, so no cross terms between tokens enter (Monte-Carlo columns sampled
            # independently per token have none in expectation and go all at once)
            cols = per_position(cols, t.mask)
        cols = list(cols)
        root = None if wp is None else wp.sqrt().unsqueeze(-1)
        for j, s in enumerate(cols):
            s = s if root is None else s * root.to(s.dtype)
            torch.autograd.grad(
                t.logits,
                params,
                grad_outputs=s.to(t.logits.dtype),
                retain_graph=j < len(cols) - 1,
                allow_unused=True,
            )
            curv.add(acts, rec.output_grads(acts), mask)
    n = t.n_data if wp is None else float((wp * t.mask).sum())
    return n, int(logits.shape[-1])


def _point_weights(w, t: B.Targets, dtype: torch.dtype) -> Tensor:
    """Per-example weights broadcast to the data points of ``t`` (positions, for a causal LM)."""
    w = torch.as_tensor(w, device=t.logits.device).to(dtype).reshape(-1)
    if w.numel() != t.mask.shape[0]:
        raise ValueError(
            f"example_weights returned {w.numel()} weights for a batch of {t.mask.shape[0]} "
            "examples; return one weight per example."
        )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("example_weights must be finite and non-negative.")
    return w.reshape(-1, *([1] * (t.mask.ndim - 1))).expand(t.mask.shape)


def _max_over_processes(n: int | None, device: torch.device) -> int | None:
    t = torch.tensor([-1 if n is None else n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return None if int(t) < 0 else int(t)


# ---------------------------------------------------------------------------- Jacobians
def output_jacobians(
    model: nn.Module,
    inputs,
    params: list[Tensor],
    sites: list[LinearSite],
    dict_key_x: str,
    dtype: torch.dtype,
    max_outputs: int,
) -> tuple[Tensor, list[Tensor]]:
    """The outputs ``(n, k)`` of ``model`` on ``inputs`` (in eval mode) and, per trainable
    tensor, the Jacobian of the outputs in it, ``(n·k, numel)`` with rows ordered example-major:
    one backward pass per output, per-example gradients from the recorded layer inputs and
    output gradients."""
    was_training = model.training
    model.eval()
    rec = Recorder(sites, dtype)
    try:
        with rec.recording(model), torch.enable_grad():
            logits = B.call_model(model, inputs, dict_key_x)
            if logits.ndim != 2:
                raise ValueError(
                    f"pred_type='glm' needs outputs (batch, k); got {tuple(logits.shape)}. For "
                    "token-level outputs use pred_type='nn'."
                )
            n, k = logits.shape
            if k > max_outputs:
                raise ValueError(
                    f"pred_type='glm' takes one backward pass per output and the model has {k}; "
                    f"the limit is {max_outputs}. Use pred_type='nn' (parameter samples)."
                )
            acts = rec.inputs()
            rows: list[list[Tensor]] = []
            for c in range(k):
                e = torch.zeros_like(logits)
                e[:, c] = 1.0
                torch.autograd.grad(
                    logits, params, grad_outputs=e, retain_graph=c < k - 1, allow_unused=True
                )
                rows.append(per_example_grads(sites, len(params), acts, rec.output_grads(acts)))
    finally:
        model.train(was_training)
    # rows ordered (n, k): example-major, so per-example blocks lie on the diagonal
    chunks = [
        torch.stack([r[i] for r in rows], dim=1).reshape(n * k, -1) for i in range(len(params))
    ]
    return logits.detach().to(dtype), chunks
