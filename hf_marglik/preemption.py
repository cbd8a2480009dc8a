"""Save a checkpoint and stop on SIGTERM, as preemptible machines (Slurm, Kubernetes, spot
instances) expect: they send SIGTERM, wait a grace period, then SIGKILL.

:class:`SigtermCheckpointCallback` is a public ``TrainerCallback``. While installed (a context
manager; :class:`~hf_marglik.MargLikTrainer` installs its own for the duration of the training
loop and restores the previous handler afterwards), SIGTERM only sets a flag. At the next
optimizer-step boundary, after that step's marginal-likelihood update (if one is due) and before
the Trainer logs and saves, the callback sets ``control.should_save`` and
``control.should_training_stop``: the Trainer writes ``checkpoint-<step>`` through its usual path
(``on_save`` included, so ``marglik_state.pt`` is in it) and leaves the loop. A curvature fit or
hyper-update that is running when the signal arrives finishes first; if the grace period is
shorter, the SIGKILL that follows loses only the work since the last complete checkpoint (see
``MargLikTrainer.train(resume_from_checkpoint=True)``).

transformers' own ``enable_jit_checkpoint`` calls a private save method that skips ``on_save``,
so its checkpoints would lack the marginal-likelihood state; ``MargLikTrainingArguments`` turns
it into ``save_on_sigterm`` instead. With several processes the flag is shared (one all-reduce
per optimizer step), so every process stops at the same step. The handler is installed only from
the main thread (Python allows no other); elsewhere SIGTERM keeps its previous meaning.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist
from transformers import TrainerCallback

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
"""The exit status of ``scripts/train.py`` after a SIGTERM checkpoint (143, the shell's code
for a process ended by SIGTERM): the run did not finish, a checkpoint was written."""


class SigtermCheckpointCallback(TrainerCallback):
    """On SIGTERM: checkpoint at the next optimizer-step boundary, then stop training.

    ``stopped_at`` is the global step of that checkpoint (None while no SIGTERM was handled).
    Use as ``with callback: trainer.train()`` after ``trainer.add_callback(callback)``.
    """

    def __init__(self):
        self.received = False
        self.stopped_at: int | None = None
        self._previous = None
        self._installed = False

    # ------------------------------------------------------------------ the signal handler
    def install(self) -> bool:
        """Handle SIGTERM from now on (main thread only); returns whether it was installed."""
        self.received, self.stopped_at = False, None
        if threading.current_thread() is not threading.main_thread() or self._installed:
            return self._installed
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True
        return True

    def restore(self) -> None:
        """Give SIGTERM back to the handler that was there before :meth:`install`."""
        if self._installed:
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)
            self._installed = False

    def __enter__(self) -> SigtermCheckpointCallback:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame) -> None:
        self.received = True

    # ------------------------------------------------------------------ callback events
    def _stop_requested(self) -> bool:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor(float(self.received))
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())
        return self.received

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and self._stop_requested():
            self.received = True
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # saved at this step already; leave quickly
            control.should_save = False
            control.should_evaluate = False
