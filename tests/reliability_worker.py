"""A small MargLikTrainer run that tests/test_reliability.py interrupts with SIGKILL or SIGTERM.

    python tests/reliability_worker.py OUT_DIR

A float64 MLP on 24 points, CPU, one thread, fixed seeds: 3 optimizer steps per epoch, 3 epochs,
a marginal-likelihood update after every epoch (steps 3, 6, 9), a checkpoint after every step.
The run writes OUT_DIR/result.json (the final hyperparameters, histories and parameters) and
exits 0, or after a SIGTERM checkpoint ``SIGTERM_EXIT_CODE`` (143).

Environment (the test's hooks, all in this script, none in the library):

- ``RELIABILITY_PAUSE=fit:S`` pauses inside the curvature fit of the update at global step S (a
  forward pre-hook on the model: the fit runs the model in eval mode, training in train mode);
  ``hyper:S`` pauses inside that update's third hyper-step (a gradient hook on the log prior
  precision, which only the hyper-steps differentiate), after two Adam steps changed it.
- ``RELIABILITY_SAVE=no``: no periodic checkpoints.
- ``RELIABILITY_MARKER=PATH``: at the pause the worker writes PATH and then waits: for SIGKILL
  (nothing more happens), or with ``RELIABILITY_AFTER=sigterm`` until SIGTERM was received, then
  it goes on (the trainer then checkpoints at the end of step S and stops).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from models import TinyData, TinyNet  # tests/ is this script's folder
from transformers import TrainerCallback

from hf_marglik import MargLikTrainer, MargLikTrainingArguments
from hf_marglik.preemption import SIGTERM_EXIT_CODE

WAIT_S = 120  # never wait longer than this at a pause (a test that died leaves no orphan)


def make_trainer(out_dir: str, callbacks=(), save: bool = True) -> MargLikTrainer:
    """The run; ``save=False``: no periodic checkpoints (only a SIGTERM one)."""
    torch.manual_seed(0)
    args = MargLikTrainingArguments(
        output_dir=out_dir,
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        num_train_epochs=3,
        save_strategy="steps" if save else "no",
        save_steps=1,
        logging_steps=1,
        n_hypersteps=5,
        dict_key_x="x",
        disable_tqdm=True,
        seed=0,
        backend="ggn",  # a curvature pass at every update: the kills hit it
        marglik_curvature="fit",
    )
    return MargLikTrainer(
        model=TinyNet().double(), args=args, train_dataset=TinyData(), callbacks=list(callbacks)
    )


def result(trainer: MargLikTrainer) -> dict:
    """What an interrupted-and-resumed run must reproduce exactly."""
    hyper = trainer.hyperparameters()
    return {
        "prior_precision": hyper["prior_precision"],
        "log_marglik": hyper["log_marglik"],
        "margliks": list(trainer.margliks),
        "losses": list(trainer.losses),
        "update_steps": list(trainer.marglik_update_steps),
        "params": [p.detach().reshape(-1).tolist() for p in trainer.model.parameters()],
    }


class Pause(TrainerCallback):
    """Installs the pause hook of ``RELIABILITY_PAUSE`` when training begins."""

    def __init__(self, where: str, step: int, marker: str, after: str):
        self.where, self.step, self.marker, self.after = where, step, marker, after
        self.trainer: MargLikTrainer | None = None
        self.state = None
        self.hyper_steps = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = state
        if self.where == "fit":
            model.register_forward_pre_hook(self._in_fit)
        else:
            self.trainer.marglik_loop.hyper.log_prior_prec.register_hook(self._in_hyper)

    def _in_fit(self, module, inputs):
        if not module.training and self.state.global_step == self.step:
            self._pause()

    def _in_hyper(self, grad):
        if self.state.global_step == self.step:
            self.hyper_steps += 1
            if self.hyper_steps == 3:
                self._pause()
        return grad

    def _pause(self) -> None:
        with open(self.marker, "w") as f:
            f.write(f"{self.where} at step {self.state.global_step}\n")
        stop = self.trainer.sigterm_callback
        start = time.monotonic()
        while time.monotonic() - start < WAIT_S:
            if self.after == "sigterm" and stop.received:
                return
            time.sleep(0.01)
        sys.exit(3)


def main(out_dir: str) -> int:
    torch.set_num_threads(1)
    callbacks = []
    pause = os.environ.get("RELIABILITY_PAUSE")
    if pause:
        where, step = pause.split(":")
        callbacks.append(
            Pause(
                where,
                int(step),
                os.environ["RELIABILITY_MARKER"],
                os.environ.get("RELIABILITY_AFTER", "sigkill"),
            )
        )
    trainer = make_trainer(out_dir, callbacks, save=os.environ.get("RELIABILITY_SAVE") != "no")
    for c in callbacks:
        c.trainer = trainer
    trainer.train()
    stopped = trainer.sigterm_callback.stopped_at
    out = {"stopped_at": stopped} if stopped is not None else result(trainer)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(out, f)
    return SIGTERM_EXIT_CODE if stopped is not None else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
