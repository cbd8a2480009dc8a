"""Peak bytes of live tensor storage created inside a block: a memory measure that depends on
what the code keeps alive, not on the allocator, the thread count or other processes.

:class:`LiveBytes` is a ``TorchDispatchMode``: every tensor an operator returns (forward,
backward and the forward that gradient checkpointing re-runs in the backward, which all pass
through the dispatcher on the calling thread on CPU) has its storage counted once, from when it
is first seen until it is freed (a ``weakref.finalize`` on the storage object, which torch
keeps alive exactly as long as the storage). Storages that existed before the block (the
parameters) are not counted; views share their base's storage and count nothing.

Used by tests/test_precision.py (fit against training step), tests/test_memory_plan.py (the
planned peak against a run's) and benchmarks/bench_llm_memory.py.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as m: ...``; then ``m.peak`` (bytes) and ``m.current`` (still alive)."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: dict[int, int] = {}  # id(storage object) -> bytes counted

    def _free(self, key: int) -> None:
        self.current -= self._seen.pop(key, 0)

    def _count(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        key, n = id(s), s.nbytes()
        old = self._seen.get(key)
        if old is None:
            self._seen[key] = n
            self.current += n
            weakref.finalize(s, self._free, key)
        elif n != old:  # resized in place
            self._seen[key] = n
            self.current += n - old
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output on an input's storage that is not counted is a view of (or an in-place
        # update to) a tensor from before the block, e.g. a parameter: not new memory
        before = {
            id(t.untyped_storage())
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in self._seen
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in before:
                self._count(t)
        return out
