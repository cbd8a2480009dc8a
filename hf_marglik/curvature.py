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
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import asdl
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .batches import Targets
from .factors import DenseFactor, SketchedFactor, new_factor
from .options import Backend, HessianStructure, KFACApprox

MAX_EXACT_OUTPUTS = 1024
MAX_REDUCED_OUTPUTS = 64  # exact GGN: C − 1 columns up to here (a C × C eigh per data point)


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


def check_outputs(n_outputs: int, backend: Backend) -> None:
    if backend == Backend.GGN and n_outputs > MAX_EXACT_OUTPUTS:
        raise ValueError(
            f"backend='ggn' (exact GGN) needs one backward pass per output and the model has "
            f"{n_outputs} outputs (a vocabulary?). Use backend='ggn-mc' (Monte-Carlo GGN, one "
            "backward per sample) or backend='ef'."
        )


def _softmax_hessian_root(p: Tensor) -> list[Tensor]:
    """``C − 1`` columns ``s`` with ``Σ_s s sᵀ = diag(p) − p pᵀ`` (per example), one fewer
    backward pass than the ``C`` columns ``√p_c (e_c − p)``: the Hessian has rank ``C − 1``
    (``1`` is in its kernel), so it is ``U M Uᵀ`` for an orthonormal basis ``U`` of ``1^⊥`` and
    ``M = Uᵀ H U`` (``C − 1`` square), and the columns are ``U V √Λ`` from ``M = V Λ Vᵀ``."""
    C = p.shape[-1]
    q = p.double()
    H = torch.diag_embed(q) - q.unsqueeze(-1) * q.unsqueeze(-2)
    # U: the last C − 1 columns of the Q factor of [1, I] (orthonormal, orthogonal to 1)
    ones = torch.ones(C, 1, dtype=q.dtype, device=q.device)
    U = torch.linalg.qr(torch.cat([ones, torch.eye(C, dtype=q.dtype, device=q.device)], 1))[0]
    U = U[:, 1:]
    lam, V = torch.linalg.eigh(U.T @ H @ U)
    S = (U @ V) * lam.clamp_min(0).sqrt().unsqueeze(-2)  # (..., C, C − 1)
    return [S[..., k].to(p.dtype) for k in range(C - 1)]


def loss_columns(
    t: Targets, backend: Backend, n_samples: int = 1, generator: torch.Generator | None = None
) -> Iterator[Tensor]:
    """Columns ``s`` (shaped like ``t.logits``) with ``Σ_s s sᵀ`` = the curvature of the loss in
    the logits at unit noise: exact GGN, Monte-Carlo GGN or empirical Fisher."""
    f = t.logits.detach()
    m = t.mask.unsqueeze(-1).to(f.dtype)
    categorical = t.y.dtype in (torch.long, torch.int, torch.int32)
    if categorical:
        p = torch.softmax(f, dim=-1)
        if backend == Backend.GGN and 1 < f.shape[-1] <= MAX_REDUCED_OUTPUTS:
            yield from (s * m for s in _softmax_hessian_root(p))
        elif backend == Backend.GGN:
            for c in range(f.shape[-1]):
                s = -p * p[..., c : c + 1].sqrt()
                s[..., c] += p[..., c].sqrt()
                yield s * m
        elif backend == Backend.GGN_MC:
            flat = p.reshape(-1, p.shape[-1])
            for _ in range(n_samples):
                y = torch.multinomial(flat, 1, generator=generator).reshape(p.shape[:-1])
                onehot = nn.functional.one_hot(y, p.shape[-1]).to(f.dtype)
                yield (p - onehot) * m / math.sqrt(n_samples)
        else:
            yield (p - nn.functional.one_hot(t.y, p.shape[-1]).to(f.dtype)) * m
    else:
        if backend == Backend.GGN:
            for c in range(f.shape[-1]):
                s = torch.zeros_like(f)
                s[..., c] = 1.0
                yield s * m
        elif backend == Backend.GGN_MC:
            for _ in range(n_samples):
                eps = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
                yield eps * m / math.sqrt(n_samples)
        else:
            yield (f - t.y) * m


def per_position(columns: Iterator[Tensor], mask: Tensor) -> Iterator[Tensor]:
    """Split each column of a token-level likelihood into one column per position, so that
    per-example gradients are per target token (exact ``full``/``diag`` for causal LMs)."""
    positions = mask.any(0).nonzero().flatten().tolist()
    for s in columns:
        for t in positions:
            single = torch.zeros_like(s)
            single[:, t] = s[:, t]
            yield single


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
                self._cxt = cxt
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
    """Accumulates the curvature of one fit, batch by batch."""

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
            self.A: dict[int, DenseFactor | SketchedFactor] = {}  # site -> Σ a aᵀ
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

        Layers that read the very same input tensor (LoRA ``A`` of ``q_proj`` and ``v_proj``)
        share one input factor object: accumulated and eigendecomposed once. Should a later
        batch feed them different inputs, the shared factor is split first.
        """
        if self.structure != HessianStructure.KRON:
            return
        keys = {
            i: (a.data_ptr(), tuple(a.shape), tuple(a.stride()), a.dtype)
            for i, (s, a) in enumerate(zip(self.sites, inputs))
            if s.weight_index is not None
        }
        for i in keys:
            for j in keys:
                if j < i and i in self.A and self.A[i] is self.A[j] and keys[i] != keys[j]:
                    self.A[i] = copy.deepcopy(self.A[i])
        first: dict[tuple, int] = {}
        done: set[int] = set()
        for i, key in keys.items():
            if i not in self.A:
                j = first.get(key)
                self.A[i] = self.A[j] if j is not None else self._factor(inputs[i].shape[-1], 2 * i)
            first.setdefault(key, i)
            if id(self.A[i]) in done:
                continue
            rows, count = self._input_rows(inputs[i], mask, weights)
            self.A[i].add(rows)
            self.A[i].count += count
            done.add(id(self.A[i]))

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
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        if self.structure != HessianStructure.KRON:
            dist.all_reduce(self.H)
            return
        for i in sorted(self.B):
            self.B[i].all_reduce()
        for factor in _unique(self.A[i] for i in sorted(self.A)):
            factor.all_reduce()
            count = torch.tensor(float(factor.count), dtype=torch.float64, device=self.device)
            dist.all_reduce(count)
            factor.count = float(count.item())

    def kron_eigs(self, scale: float = 1.0) -> tuple[list[tuple], int]:
        """Per trainable tensor (parameter order) ``(λ_B, Q_B, λ_A, Q_A)`` of the factors
        ``B = scale · Σ g gᵀ`` and ``A = mean a aᵀ`` (``λ_A, Q_A`` None for a bias), and the
        number of negative eigenvalues (rounding) clipped to 0."""
        sides = [_side(f) for f in [*self.A.values(), *self.B.values()]]
        with _one_thread(self.device.type == "cpu" and max(sides, default=0) <= ONE_THREAD_EIGH):
            return self._kron_eigs(scale)

    def _kron_eigs(self, scale: float) -> tuple[list[tuple], int]:
        out: list[tuple | None] = [None] * len(self.sizes)
        clipped = 0
        eigs_of_A: dict[int, tuple] = {}  # shared input factors are decomposed once
        for i, s in enumerate(self.sites):
            lb, qb, nb = self.B[i].eig(scale)
            clipped += nb
            if s.weight_index is not None:
                A = self.A[i]
                if id(A) not in eigs_of_A:
                    eigs_of_A[id(A)] = A.eig(1.0 / max(A.count, 1))
                    clipped += eigs_of_A[id(A)][2]
                la, qa, _ = eigs_of_A[id(A)]
                out[s.weight_index] = (lb, qb, la, qa)
            if s.bias_index is not None:
                out[s.bias_index] = (lb, qb, None, None)
        return out, clipped


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


def _unique(objects) -> list:
    seen, out = set(), []
    for o in objects:
        if id(o) not in seen:
            seen.add(id(o))
            out.append(o)
    return out


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
