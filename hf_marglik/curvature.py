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

A model that trains with gradient checkpointing is fitted with it (:func:`pass_modes`): each
backward pass re-runs the forward of the checkpointed layers, whose inputs the :class:`Recorder`
does not record again, and K-FAC takes each input and output gradient as it is recorded, so
that a fit holds about the memory of a training step.

ASDL's own Fisher makers are not used: they add into ``.grad``, leave ``fisher`` attributes that
crash peft's ``ModulesToSaveWrapper`` on a second call, sum ``A`` over tokens, ignore index -1
rather than -100 and sample targets at padded positions (see NOTES.md).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial

import asdl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import batches as B
from .columns import check_outputs, loss_columns, per_position
from .draws import LabelDraws
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
    """The inputs and output gradients of the sites, as ASDL's hooks record them.

    ASDL (``asdl.save_inputs_outgrads``) appends each site's input in the forward pass and its
    output gradient in each backward pass to a record. Hooks of ours, registered after ASDL's on
    the same modules, take each record out as soon as ASDL has made it and either hand it on
    (``on_input(i, a)`` of :meth:`forward`, ``on_grad(i, g)`` of :meth:`backward`; nothing is
    kept) or keep it for :meth:`inputs` / :meth:`output_grads`. Handing on matters with gradient
    checkpointing: keeping every layer's input and output gradient until the end of a pass would
    keep as much memory as the activations that checkpointing frees.

    Inputs come from the forward pass only. A forward pass is the :meth:`forward` block or,
    without one, everything up to the first :meth:`inputs` call. With gradient checkpointing
    each backward pass re-runs the forward of the checkpointed layers, and the forward hooks of
    their sites fire again: an input recorded outside the forward pass is such a re-run and is
    dropped, so each site's input counts once and pairs with the output gradients of every
    backward pass of the batch.
    """

    def __init__(self, sites: list[LinearSite], dtype: torch.dtype):
        self.sites, self.dtype = sites, dtype
        self._cxt, self.batched = None, False
        self._start_forward(None)
        self._start_backward(None)

    @contextlib.contextmanager
    def recording(self, model: nn.Module, batched: bool = False):
        """Record inputs and output gradients of the sites (ASDL hooks) inside the block.

        ``batched``: record the sites' inputs and outputs with plain forward hooks instead, for
        :meth:`batched_output_grads` (ASDL's backward hooks cannot run under ``vmap``); the
        one-at-a-time :meth:`backward` is then not available. Not with gradient checkpointing
        (a re-run forward would be recorded as a new pass)."""
        if batched:
            with self._recording_outputs(model):
                yield self
            return
        with warnings.catch_warnings():
            # ASDL registers module backward hooks of the pre-full kind (and so does the Recorder,
            # to run after them); their grad_output (all that is read here) is correct, the
            # deprecation warning is noise for users.
            warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
            warnings.filterwarnings("ignore", message=".*backward hook.*deprecated.*")
            with asdl.save_inputs_outgrads(model, targets=[s.module for s in self.sites]) as cxt:
                handles = []
                self._cxt, self.model = cxt, model
                try:
                    for i, s in enumerate(self.sites):
                        handles.append(s.module.register_forward_hook(partial(self._took_input, i)))
                        handles.append(s.module.register_backward_hook(partial(self._took_grad, i)))
                    yield self
                finally:
                    for h in handles:
                        h.remove()
                    self._cxt = None

    @contextlib.contextmanager
    def _recording_outputs(self, model: nn.Module):
        handles = [
            s.module.register_forward_hook(partial(self._took_output, i))
            for i, s in enumerate(self.sites)
        ]
        self.model, self.batched = model, True
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.batched = False

    def _took_output(self, i: int, module: nn.Module, args, output) -> None:
        if not self._in_forward:
            return
        self._calls[i] += 1
        if self._calls[i] > 1:
            raise ValueError(
                f"Layer {self.sites[i].name!r} was called {self._calls[i]} times in one forward "
                "pass; weight sharing across calls is not supported by hf_marglik's curvature."
            )
        a = args[0].detach()
        self._shapes[i], self._outputs[i] = a.shape, output
        if self._on_input is not None:
            self._on_input(i, a)
        else:
            self._inputs[i] = a

    def batched_output_grads(
        self, root: Tensor, columns: Tensor, retain_graph: bool
    ) -> list[Tensor]:
        """The output gradients ``(K, *batch, d_out)`` of every site for ``K`` vectors
        backpropagated from ``root`` at once (``columns`` shaped ``(K, *root.shape)``; one
        ``vmap``-ed backward pass, ``is_grads_batched``). Needs ``recording(batched=True)``."""
        if not self.batched:
            raise RuntimeError("batched_output_grads needs recording(model, batched=True).")
        self._end_forward()
        one = columns.shape[0] == 1  # a plain backward pass: no vmap
        grads = torch.autograd.grad(
            root,
            self._outputs,
            grad_outputs=columns[0] if one else columns,
            retain_graph=retain_graph,
            allow_unused=True,
            is_grads_batched=not one,
        )
        if one:
            grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
        out = []
        for s, g in zip(self.sites, grads):
            if g is None:
                raise RuntimeError(f"Layer {s.name!r} saw no backward pass.")
            out.append(g.to(self.dtype))
        if not retain_graph:
            self._outputs = [None] * len(self.sites)
        return out

    def _start_forward(self, on_input) -> None:
        self._on_input, self._in_forward = on_input, True
        self._calls = [0] * len(self.sites)
        self._shapes: list[torch.Size | None] = [None] * len(self.sites)
        self._inputs: list[Tensor | None] = [None] * len(self.sites)
        self._outputs: list[Tensor | None] = [None] * len(self.sites)

    def _end_forward(self) -> None:
        if not self._in_forward:
            return
        self._in_forward, self._on_input = False, None
        for s, n in zip(self.sites, self._calls):
            if n == 0:
                raise RuntimeError(f"Layer {s.name!r} was not called in the forward pass.")

    def _start_backward(self, on_grad) -> None:
        self._on_grad = on_grad
        self._grads: list[list[Tensor]] = [[] for _ in self.sites]
        self._n_grads = [0] * len(self.sites)

    def _took_input(self, i: int, module: nn.Module, args, output) -> None:
        if self._cxt is None:
            return
        recorded = self._cxt.in_data(module, pop=True)  # ASDL's record of this call
        if not recorded or not self._in_forward:
            return  # a re-run of the forward by gradient checkpointing in a backward pass
        self._calls[i] += 1
        if self._calls[i] > 1:
            raise ValueError(
                f"Layer {self.sites[i].name!r} was called {self._calls[i]} times in one forward "
                "pass; weight sharing across calls is not supported by hf_marglik's curvature."
            )
        a = recorded[-1]
        self._shapes[i] = a.shape
        if self._on_input is not None:
            self._on_input(i, a)
        else:
            self._inputs[i] = a

    def _took_grad(self, i: int, module: nn.Module, grad_input, grad_output) -> None:
        if self._cxt is None:
            return  # a graph recorded inside the block, backpropagated after it
        recorded = self._cxt.out_grads(module, pop=True)
        if not recorded:
            return
        self._n_grads[i] += len(recorded)
        shape = self._shapes[i]
        for g in recorded:
            g = g.to(self.dtype)
            if shape is not None:
                g = g.reshape(*shape[:-1], g.shape[-1])
            if self._on_grad is not None:
                self._on_grad(i, g)
            else:
                self._grads[i].append(g)

    @contextlib.contextmanager
    def forward(self, on_input=None):
        """One forward pass of the model inside the block: every site must be called once.
        ``on_input(i, a)`` takes each site's input as it is recorded (in ASDL's dtype; nothing
        is kept); without it the inputs are kept for :meth:`inputs`."""
        self._start_forward(on_input)
        try:
            yield self
        except BaseException:
            self._in_forward, self._on_input = False, None
            raise
        self._end_forward()

    @contextlib.contextmanager
    def backward(self, on_grad=None):
        """One backward pass inside the block. With ``on_grad(i, g)``, each site's output
        gradient (shaped like its input) is handed on as it arrives and every site must get
        exactly one; without it they are kept for :meth:`output_grads`."""
        self._start_backward(on_grad)
        try:
            yield self
        finally:
            self._on_grad = None
        if on_grad is not None:
            self._check_grads()

    def _check_grads(self) -> None:
        for s, n in zip(self.sites, self._n_grads):
            if n != 1:
                raise RuntimeError(f"Layer {s.name!r} saw {n} backward passes, expected 1.")

    def inputs(self) -> list[Tensor]:
        """Inputs of each site in the forward pass (in ``dtype``); ends the forward pass."""
        self._end_forward()
        out = [a.to(self.dtype) for a in self._inputs]
        self._inputs = [None] * len(self.sites)
        return out

    def output_grads(self, inputs: list[Tensor]) -> list[Tensor]:
        """Output gradients of each site in the last backward pass, shaped like its inputs."""
        self._check_grads()
        out = [g[0].reshape(*a.shape[:-1], g[0].shape[-1]) for g, a in zip(self._grads, inputs)]
        self._start_backward(None)
        return out


@dataclass
class _InputBatch:
    """The input factors' state within one forward pass (:meth:`Curvature.add_input`)."""

    mask: Tensor | None
    weights: Tensor | None
    seen: dict = field(default_factory=dict)  # site -> (tensor key, weak ref to its storage)
    pending: dict = field(default_factory=dict)  # accumulator -> the input its rows come from


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
            self._input_keys: list[int] = []  # the seed key each input accumulator was made with
            self.a_of: dict[int, int] = {}  # site -> index into inputs
            self.B: dict[int, DenseFactor | SketchedFactor] = {}  # site -> Σ g gᵀ
            self._b_side: dict[int, int] = {}

    def add(self, inputs: list[Tensor], grads: list[Tensor], mask: Tensor | None) -> None:
        """Add one column's contribution (all examples of the batch)."""
        if self.structure == HessianStructure.KRON:
            for i, g in enumerate(grads):
                self._add_kron(i, g)  # shaped like the input
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
        one per example, example ``n``'s rows count ``w_n`` times. The same as
        :meth:`begin_inputs`, :meth:`add_input` for each site in order, :meth:`end_inputs`."""
        if self.structure != HessianStructure.KRON:
            return
        self.begin_inputs(mask, weights)
        for i, a in enumerate(inputs):
            self.add_input(i, a)
        self.end_inputs()

    def begin_inputs(self, mask: Tensor | None, weights: Tensor | None = None) -> None:
        """Start the input factors of one forward pass, fed one site at a time by
        :meth:`add_input` as the forward pass reaches it, up to :meth:`end_inputs`."""
        self._batch = _InputBatch(mask, weights)

    def add_input(self, i: int, a: Tensor) -> None:
        """Site ``i``'s input in the current forward pass (K-FAC only).

        Sites whose inputs are the same tensor share one accumulator (``a`` is compared with the
        earlier inputs of the pass that are still alive, so a new tensor at a freed one's address
        is not taken for it). Should a later batch feed them different inputs, the shared
        accumulator is split (each keeps the sum so far): the rows of an accumulator that more
        sites share wait until all of them have been seen in the pass.
        """
        if self.structure != HessianStructure.KRON or self.sites[i].weight_index is None:
            return
        b = self._batch
        storage = a.untyped_storage()
        key = (a.data_ptr(), tuple(a.shape), tuple(a.stride()), a.dtype)
        partner = next((j for j, (k, ref) in b.seen.items() if k == key and ref() is storage), None)
        b.seen[i] = (key, weakref.ref(storage))
        k = self.a_of.get(i)
        if k is None and partner is not None:
            self.a_of[i] = self.a_of[partner]  # the same tensor: its rows count once
        elif k is None:
            self.a_of[i] = len(self.inputs)
            self.inputs.append(self._factor(a.shape[-1], 2 * i))
            self._input_keys.append(2 * i)
            b.pending[self.a_of[i]] = a
        elif partner is None or self.a_of[partner] != k:
            if any(self.a_of.get(j) == k for j in b.seen if j != i):
                # k was fed another input in this pass; its rows of this pass are still pending,
                # so the copy is k before this pass
                self.a_of[i] = len(self.inputs)
                self.inputs.append(copy.deepcopy(self.inputs[k]))
                self._input_keys.append(self._input_keys[k])
            b.pending[self.a_of[i]] = a
        self._flush_inputs(all_seen=True)

    def end_inputs(self) -> None:
        """End the forward pass: every pending accumulator gets its rows."""
        self._flush_inputs(all_seen=False)
        self._batch = None

    def _flush_inputs(self, all_seen: bool) -> None:
        b = self._batch
        for k in list(b.pending):
            if all_seen and any(j not in b.seen for j, kk in self.a_of.items() if kk == k):
                continue
            a = b.pending.pop(k)
            rows, count = self._input_rows(a.to(self.dtype), b.mask, b.weights)
            factor = self.inputs[k]
            factor.add(rows)
            factor.count += count

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

    def add_output_grad(self, i: int, g: Tensor) -> None:
        """Site ``i``'s output gradient of one column, shaped like its input (K-FAC only)."""
        self._add_kron(i, g)

    def _add_kron(self, i: int, g: Tensor) -> None:
        g2 = (
            g.reshape(-1, g.shape[-1])
            if g.ndim == 2 or self.kfac_approx == KFACApprox.EXPAND
            else None
        )
        if g2 is None:
            g2 = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
        if i not in self.B:
            self.B[i] = self._factor(g2.shape[1], 2 * i + 1)
            self._b_side[i] = g2.shape[1]
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

    @property
    def empty(self) -> bool:
        """Whether nothing has been added yet."""
        if self.structure != HessianStructure.KRON:
            return not bool(self.H.any())
        return not self.B

    def state_dict(self) -> dict:
        """The running sums (to continue accumulating after a resume)."""
        if self.structure != HessianStructure.KRON:
            return {"H": self.H.clone()}
        return {
            "inputs": [
                (f.d if hasattr(f, "d") else f.M.shape[0], f.state_dict()) for f in self.inputs
            ],
            "input_keys": list(self._input_keys),
            "a_of": dict(self.a_of),
            "B": {i: (f.state_dict(), self._b_side[i]) for i, f in self.B.items()},
        }

    def load_state_dict(self, sd: dict) -> None:
        if self.structure != HessianStructure.KRON:
            self.H.copy_(sd["H"])
            return
        self.inputs, self._input_keys = [], list(sd["input_keys"])
        for (d, state), key in zip(sd["inputs"], self._input_keys):
            factor = self._factor(d, key)
            factor.load_state_dict(state)
            self.inputs.append(factor)
        self.a_of = {int(k): int(v) for k, v in sd["a_of"].items()}
        self.B, self._b_side = {}, {}
        for i, (state, d) in sd["B"].items():
            i = int(i)
            self.B[i] = self._factor(d, 2 * i + 1)
            self.B[i].load_state_dict(state)
            self._b_side[i] = d

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


# ---------------------------------------------------------------------------- module modes
@contextlib.contextmanager
def pass_modes(model: nn.Module):
    """The modules' modes for a curvature pass: eval mode (dropout off), with the model's
    gradient checkpointing kept.

    Hugging Face layers (``transformers.modeling_layers.GradientCheckpointingLayer``) checkpoint
    only when their ``gradient_checkpointing`` and ``training`` flags are both on, so in plain
    eval mode a model that trains with checkpointing would backpropagate with all its
    activations kept. Inside the block every module is in eval mode, except that each
    checkpointing layer's ``training`` flag is on while the layer decides whether to
    checkpoint: its checkpoint function is wrapped so that the layer's own forward (in the
    forward pass, and when a backward pass re-runs it) sees ``training=False``. Dropout, in a
    child module (attention dropout reads the attention module's own flag) or in the layer's
    own forward, stays off, and the function computed is the eval-mode one with or without
    checkpointing. The checkpoint runs non-reentrant (the pass takes ``torch.autograd.grad``,
    which reentrant checkpointing refuses) and the configs' ``use_cache`` is off (a KV cache
    written in the forward pass would be written again by each re-run).

    Every module's ``training`` flag, the checkpoint functions and ``use_cache`` are restored
    afterwards, also when the block raises.
    """
    modes = [(m, m.training) for m in model.modules()]
    layers = checkpointing_layers(model)
    configs = {}
    if layers:
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if getattr(cfg, "use_cache", None):
                configs[id(cfg)] = (cfg, cfg.use_cache)
    model.eval()
    saved = [(layer, layer.__dict__.get("_gradient_checkpointing_func")) for layer in layers]
    try:
        for layer, checkpoint in saved:
            layer._gradient_checkpointing_func = _checkpoint_in_eval(layer, checkpoint)
            layer.training = True
        for cfg, _ in configs.values():
            cfg.use_cache = False
        yield
    finally:
        for layer, checkpoint in saved:
            if checkpoint is None:
                layer.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                layer._gradient_checkpointing_func = checkpoint
        for m, flag in modes:
            m.training = flag
        for cfg, value in configs.values():
            cfg.use_cache = value


def checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` that train with gradient checkpointing (transformers'
    ``GradientCheckpointingLayer`` with ``gradient_checkpointing`` on: what
    ``gradient_checkpointing_enable()``, or the Trainer's ``gradient_checkpointing=True``, turns
    on, also through a peft wrapper). Other modules that checkpoint (the loops of some older
    transformers models) are not kept by :func:`pass_modes`: a warning says so."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        GradientCheckpointingLayer = ()  # noqa: N806
    layers, other = [], []
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is not True:
            continue
        if isinstance(m, GradientCheckpointingLayer) and callable(
            m.__dict__.get("_gradient_checkpointing_func")
        ):
            layers.append(m)
        else:
            other.append(m)
    ids = {id(layer) for layer in layers}
    for m in other:
        inner = any(id(c) in ids for c in m.modules())
        if not inner and getattr(m, "_gradient_checkpointing_func", None) is not None:
            warnings.warn(
                f"{type(m).__name__} trains with gradient checkpointing of a kind the curvature "
                "pass cannot keep (only transformers' GradientCheckpointingLayer layers): the "
                "pass runs without it and keeps every activation.",
                stacklevel=3,
            )
            break
    return layers


def _checkpoint_in_eval(layer: nn.Module, checkpoint):
    """``checkpoint`` (the layer's checkpoint function), non-reentrant, running the layer's
    forward with ``layer.training`` off."""
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    takes = checkpoint is torch_checkpoint or "use_reentrant" in getattr(checkpoint, "keywords", {})
    off = {"use_reentrant": False} if takes else {}

    def run(function, *args, **kwargs):
        def forward_in_eval(*a, **k):
            layer.training = False
            try:
                return function(*a, **k)
            finally:
                layer.training = True

        return checkpoint(forward_in_eval, *args, **{**kwargs, **off})

    return run


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
    batch_columns: bool = False


MAX_BATCHED_COLUMNS = 16
"""Columns backpropagated together in one ``vmap``-ed backward pass (:func:`batches_columns`):
the pass's activation gradients take this many times a single backward's memory."""


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
    seed: int = 0,
    example_weights=None,
    progress_bar: bool = False,
) -> FitResult:
    """One pass over ``loader`` in eval mode (with the model's gradient checkpointing, see
    :func:`pass_modes`): the loss and the curvature at the current parameters, summed over
    data-parallel processes. ``n_data`` (the data points of the whole
    training set when ``loader`` covers a subset) rescales both by ``n_data / counted``;
    ``example_weights(batch)`` gives one weight per example (see ``Laplace.fit``). ``seed`` keys
    the Monte-Carlo labels of ``backend="ggn-mc"`` with each example's hash
    (:mod:`hf_marglik.draws`): the same labels for any batching or number of processes. The model's
    train/eval mode, ``requires_grad`` flags and ``.grad`` are restored, also when it raises."""
    sizes = [p.numel() for p in params]
    curv = Curvature(
        sites, sizes, settings.structure, settings.kfac_approx, dtype, device, settings.factor_rank
    )
    loss = torch.zeros((), dtype=dtype, device=device)
    counted, n_outputs = 0.0, None
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    try:
        rec = Recorder(sites, dtype)
        batched = batches_columns(model, settings)
        with pass_modes(model), rec.recording(model, batched=batched):
            for batch in tqdm(loader, desc="Curvature fit", disable=not progress_bar, delay=2):
                w = None if example_weights is None else example_weights(batch)
                n, k = _fit_batch(rec, curv, batch, params, settings, seed, loss, w, device)
                counted, n_outputs = counted + n, k
    finally:
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


def _fit_batch(rec, curv, batch, params, settings, seed, loss, w, device):
    inputs, y = B.split_batch(batch, settings.dict_key_x, settings.dict_key_y)
    inputs, y = B.to_device(inputs, device), B.to_device(y, device)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    # K-FAC takes each site's input and output gradient as it comes (nothing is kept: with
    # gradient checkpointing, the pass holds no more activations than a training step);
    # diag/full need the inputs again for each column's per-example gradients
    kron = curv.structure == HessianStructure.KRON
    if w is not None:  # checked before the forward pass, which takes them
        _checked_weights(w, B.batch_size(inputs, settings.dict_key_x), device, curv.dtype)
    with torch.enable_grad():
        if kron:
            curv.begin_inputs(mask, w)
        with rec.forward(curv.add_input if kron else None):
            logits = B.call_model(rec.model, inputs, settings.dict_key_x)
        if kron:
            curv.end_inputs()
        acts = None if kron else rec.inputs()
        t = B.targets_for(logits, y, settings.likelihood, mask)
        if settings.likelihood != Likelihood.REGRESSION:
            check_outputs(logits.shape[-1], settings.backend)
        wp = None if w is None else _point_weights(w, t, curv.dtype)
        loss += B.nll_sum(t, wp).detach().to(curv.dtype)
        draws = None
        if settings.backend == Backend.GGN_MC:
            x = inputs[settings.dict_key_x] if isinstance(inputs, Mapping) else inputs
            draws = LabelDraws.for_batch(seed, x, mask, settings.likelihood)
        cols = loss_columns(t, settings.backend, settings.n_mc_samples, draws)
        if settings.likelihood == Likelihood.CAUSAL_LM and settings.backend != Backend.GGN_MC:
            # each token is its own data point: its loss-Hessian columns are backpropagated
            # alone, so no cross terms between tokens enter (Monte-Carlo columns sampled
            # independently per token have none in expectation and go all at once)
            cols = per_position(cols, t.mask)
        root = None if wp is None else wp.sqrt().unsqueeze(-1)
        if rec.batched:
            _backward_batched(rec, curv, t, cols, root, acts, mask)
            cols = ()
        for s, last in _with_last(cols):  # one column at a time (the last frees the graph)
            s = s if root is None else s * root.to(s.dtype)
            with rec.backward(curv.add_output_grad if kron else None):
                torch.autograd.grad(
                    t.logits,
                    params,
                    grad_outputs=s.to(t.logits.dtype),
                    retain_graph=not last,
                    allow_unused=True,
                )
            if not kron:
                curv.add(acts, rec.output_grads(acts), mask)
    n = t.n_data if wp is None else float((wp * t.mask).sum())
    return n, int(logits.shape[-1])


def batches_columns(model: nn.Module, settings: CurvatureSettings) -> bool:
    """Whether a pass backpropagates its loss-Hessian columns in batches
    (:data:`MAX_BATCHED_COLUMNS` at a time, one ``vmap``-ed backward each) rather than one by one:
    when ``settings.batch_columns`` is on, a batch has more than one column (the exact GGN, or
    several Monte-Carlo samples) and the model does not train with gradient checkpointing
    (a checkpointed layer re-runs its forward inside the backward, which ``vmap`` would batch
    too; one column at a time keeps a fit's memory at a training step's)."""
    several = settings.backend == Backend.GGN or (
        settings.backend == Backend.GGN_MC and settings.n_mc_samples > 1
    )
    return settings.batch_columns and several and not checkpointing_layers(model)


def _backward_batched(rec, curv, t, cols, root, acts, mask) -> None:
    """Backpropagate ``cols`` :data:`MAX_BATCHED_COLUMNS` at a time and add their curvature."""
    kron = curv.structure == HessianStructure.KRON
    chunk: list[Tensor] = []
    for s, last in _with_last(cols):
        chunk.append(s if root is None else s * root.to(s.dtype))
        if len(chunk) < MAX_BATCHED_COLUMNS and not last:
            continue
        S = torch.stack(chunk).to(t.logits.dtype)
        grads = rec.batched_output_grads(t.logits, S, retain_graph=not last)
        if kron:  # the K columns are K more examples of each factor's sum
            for i, g in enumerate(grads):
                curv.add_output_grad(i, g.flatten(0, 1))
        else:
            for k in range(S.shape[0]):
                curv.add(acts, [g[k] for g in grads], mask)
        chunk = []


def _with_last(items):
    """``(item, is_last)`` pairs, one item ahead of the consumer."""
    it = iter(items)
    try:
        item = next(it)
    except StopIteration:
        return
    for following in it:
        yield item, False
        item = following
    yield item, True


def _point_weights(w, t: B.Targets, dtype: torch.dtype) -> Tensor:
    """Per-example weights broadcast to the data points of ``t`` (positions, for a causal LM)."""
    w = _checked_weights(w, t.mask.shape[0], t.logits.device, dtype)
    return w.reshape(-1, *([1] * (t.mask.ndim - 1))).expand(t.mask.shape)


def _checked_weights(w, n: int, device, dtype: torch.dtype) -> Tensor:
    w = torch.as_tensor(w, device=device).to(dtype).reshape(-1)
    if w.numel() != n:
        raise ValueError(
            f"example_weights returned {w.numel()} weights for a batch of {n} "
            "examples; return one weight per example."
        )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("example_weights must be finite and non-negative.")
    return w


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
    batch_columns: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """The outputs ``(n, k)`` of ``model`` on ``inputs`` (in eval mode, with the model's
    gradient checkpointing: :func:`pass_modes`) and, per trainable tensor, the Jacobian of the
    outputs in it, ``(n·k, numel)`` with rows ordered example-major: one backward pass per
    output (``vmap``-ed, :data:`MAX_BATCHED_COLUMNS` outputs at a time, with ``batch_columns``
    and no gradient checkpointing), per-example gradients from the recorded layer inputs and
    output gradients."""
    rec = Recorder(sites, dtype)
    batched = batch_columns and not checkpointing_layers(model)
    with pass_modes(model), rec.recording(model, batched), torch.enable_grad():
        with rec.forward():
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
        for c0 in range(0, k, MAX_BATCHED_COLUMNS) if batched else ():
            c1 = min(k, c0 + MAX_BATCHED_COLUMNS)
            E = torch.zeros(c1 - c0, *logits.shape, dtype=logits.dtype, device=logits.device)
            E[torch.arange(c1 - c0), :, torch.arange(c0, c1)] = 1.0
            grads = rec.batched_output_grads(logits, E, retain_graph=c1 < k)
            for j in range(c1 - c0):
                rows.append(per_example_grads(sites, len(params), acts, [g[j] for g in grads]))
        for c in range(k) if not batched else ():
            e = torch.zeros_like(logits)
            e[:, c] = 1.0
            with rec.backward():
                torch.autograd.grad(
                    logits, params, grad_outputs=e, retain_graph=c < k - 1, allow_unused=True
                )
            rows.append(per_example_grads(sites, len(params), acts, rec.output_grads(acts)))
    # rows ordered (n, k): example-major, so per-example blocks lie on the diagonal
    chunks = [
        torch.stack([r[i] for r in rows], dim=1).reshape(n * k, -1) for i in range(len(params))
    ]
    return logits.detach().to(dtype), chunks
