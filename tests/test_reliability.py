"""Reliability (issue 8): numerical faults, interruptions, bad input end to end.

- Numerical faults: a curvature fit with NaN / Inf (a model whose logits overflow, or whose
  backward overflows, only in the fit) or a hyper-step to a precision of 0 / Inf is skipped with
  a warning that says why; the hyperparameters stay; no NaN reaches the parameters, the logs,
  ``marglik_hyperparameters.json`` or ``marglik_state.pt``; clipped eigenvalues are logged.
- Interruptions: tests/reliability_worker.py is killed (SIGKILL) inside a curvature fit and
  inside a hyper-update, then resumed; it gets SIGTERM inside a hyper-update and checkpoints;
  ``scripts/train.py`` gets SIGTERM mid-training. The worker processes start once, together,
  when the first test of this file needs them, and run while the in-process tests run.
- Bad input: one table for ``MargLikTrainer`` and one for ``scripts/train.py``: the message names
  the problem, the exit is non-zero without a traceback, ``output_dir`` is untouched.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import reliability_worker as W
import torch
from models import DictDataset, tiny_trainer_args
from torch import nn
from transformers import TrainerCallback

from hf_marglik.laplace import NonFiniteFitError
from hf_marglik.preemption import SIGTERM_EXIT_CODE
from hf_marglik.trainer import HYPERPARAMETERS_NAME, STATE_NAME, MargLikTrainer
from hf_marglik.training_args import MargLikTrainingArguments

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "reliability_worker.py"
TRAIN = ROOT / "scripts" / "train.py"
TRAIN_TINY = [
    "--max_train_samples", "16",
    "--max_eval_samples", "8",
    "--max_test_samples", "8",
    "--max_seq_length", "32",
    "--num_train_epochs", "1",
    "--disable_tqdm", "true",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _env(**extra) -> dict:
    return {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **extra,
    }


# ============================================================================ subprocesses
class Background:
    """The processes of the ``test_process_*`` tests, started together (their start-up, mostly
    imports, overlaps the in-process tests). A worker waits at its pause for the test's signal;
    output goes to files, so no pipe can fill up and block a process."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}
        for name, pause, after, save in (
            ("kill_fit", "fit:6", "sigkill", "steps"),
            ("kill_hyper", "hyper:6", "sigkill", "steps"),
            ("term_hyper", "hyper:6", "sigterm", "no"),
        ):
            env = _env(
                RELIABILITY_PAUSE=pause,
                RELIABILITY_MARKER=str(tmp / f"{name}.marker"),
                RELIABILITY_AFTER=after,
                RELIABILITY_SAVE=save,
            )
            self._start(name, [str(WORKER), str(tmp / name)], env)
        (tmp / "bad.yaml").write_text("lora_r: four\n")
        self._start(
            "train_py_bad",
            [str(TRAIN), "--config", str(tmp / "bad.yaml"), "--output_dir",
             str(tmp / "train_py_bad")],
            _env(),
        )  # fmt: skip
        self._start(
            "train_py",
            [str(TRAIN), "--marglik", *TRAIN_TINY, "--max_train_samples", "24",
             "--per_device_train_batch_size", "1", "--num_train_epochs", "3",
             "--logging_steps", "1", "--output_dir", str(tmp / "train_py")],
            _env(PYTHONUNBUFFERED="1"),
        )  # fmt: skip
        self.sigterm_after_first_step("train_py")

    def _start(self, name: str, argv: list[str], env: dict) -> None:
        with open(self.tmp / f"{name}.out", "w") as out, open(self.tmp / f"{name}.err", "w") as err:
            self.procs[name] = subprocess.Popen(
                [sys.executable, *argv], env=env, stdout=out, stderr=err
            )

    def output(self, name: str) -> tuple[str, str]:
        return (self.tmp / f"{name}.out").read_text(), (self.tmp / f"{name}.err").read_text()

    def wait_for(self, name: str, ready, timeout: float = 300) -> None:
        """Until ``ready()``; fails if the process ends first or the time runs out."""
        proc, start = self.procs[name], time.monotonic()
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"{name} ended ({proc.returncode}) too early: {self.output(name)[1]}")
            if time.monotonic() - start > timeout:
                pytest.fail(f"{name}: nothing after {timeout} s")
            time.sleep(0.02)

    def wait_marker(self, name: str) -> None:
        self.wait_for(name, (self.tmp / f"{name}.marker").exists)

    def sigterm_after_first_step(self, name: str) -> None:
        """In a thread: SIGTERM as soon as the process has logged its first training step, so
        that it cannot finish before its test runs (and stops using the CPU early)."""

        def watch():
            out, proc = self.tmp / f"{name}.out", self.procs[name]
            while proc.poll() is None and "'loss'" not in out.read_text():
                time.sleep(0.02)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

        threading.Thread(target=watch, daemon=True).start()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    """Started with this file's first test when any ``test_process_*`` test is selected."""
    if not any(item.name.startswith("test_process_") for item in request.session.items):
        yield None
        return
    bg = Background(tmp_path_factory.mktemp("processes"))
    yield bg
    bg.close()


# ============================================================================ tiny models
class _Overflow(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by inf (a float16-style overflow)."""

    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        return g * math.inf


class FaultyMLP(nn.Module):
    """An MLP classifier that, while ``fault`` is set, goes wrong in eval mode only (the curvature
    fit runs the model in eval mode, training in train mode): ``"logits"``: the logits overflow
    to ±inf (a diverged forward); ``"backward"``: the forward is fine, the backward through the
    hidden layer overflows (the loss stays finite, the curvature does not)."""

    def __init__(self, n_in=3, n_out=2, seed=1):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2 = nn.Linear(n_in, 8), nn.Linear(8, n_out)
        self.fault: str | None = None

    def forward(self, input_ids):
        h = torch.tanh(self.l1(input_ids))
        if self.fault == "backward" and not self.training:
            h = _Overflow.apply(h)
        out = self.l2(h)
        if self.fault == "logits" and not self.training:
            out = out * math.inf
        return out


def _data(n=16, n_in=3, labels=None):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, n_in, generator=g, dtype=torch.float64)
    y = (X[:, 0] > 0).long() if labels is None else torch.as_tensor(labels)
    return DictDataset([{"input_ids": X[i], "labels": y[i]} for i in range(n)])


def _args(out, **kw) -> MargLikTrainingArguments:
    return tiny_trainer_args(out, **kw)


class _FaultAt(TrainerCallback):
    """Sets ``model.fault`` for the updates (and the final fit) at the given global steps and
    records the prior precision after every step. Runs before MargLikTrainer's own callback."""

    def __init__(self, trainer_ref: list, fault: str, steps: set[int], final: bool):
        self.trainer_ref, self.fault, self.steps, self.final = trainer_ref, fault, steps, final
        self.precisions: dict[int, torch.Tensor] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer_ref[0]
        self.precisions[state.global_step - 1] = trainer.marglik_loop.hyper.prior_precision.clone()
        last = state.global_step == state.max_steps
        on = state.global_step in self.steps or (last and self.final)
        model.fault = self.fault if on else None


def _all_finite(obj) -> bool:
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_finite(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        return bool(torch.isfinite(obj).all()) if obj.is_floating_point() else True
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


# ============================================================================ numerical faults
@pytest.mark.parametrize("fault", ["logits", "backward"])
def test_non_finite_curvature_fit_is_skipped(tmp_path, fault):
    """Updates after epochs 1–4 (steps 2, 4, 6, 8); the fits at steps 4 and 8 and the final fit
    are made non-finite (the last model is kept, so the final fit is a new one). Those updates
    are skipped with a warning naming the cause, the hyperparameters keep their values, and
    nothing non-finite is stored, logged or saved. ``laplace`` is then a Laplace without a
    posterior: the learned precision and the MAP, posterior methods raising an error that names
    the fault; evaluate() leaves its metrics out, save_model writes no posterior."""
    ref: list = []
    spy = _FaultAt(ref, fault, {4, 8}, final=True)
    trainer = MargLikTrainer(
        model=FaultyMLP().double(),
        args=_args(
            tmp_path / "out",
            num_train_epochs=4,
            save_strategy="steps",
            save_steps=2,
            restore_best_marglik=False,
        ),
        train_dataset=_data(),
        callbacks=[spy],
    )
    ref.append(trainer)
    with pytest.warns(RuntimeWarning) as record:
        trainer.train()
    messages = [str(w.message) for w in record]
    skipped = [m for m in messages if m.startswith("Skipping the hyperparameter update at step")]
    assert len(skipped) == 2 and "curvature fit is not finite" in skipped[0]
    if fault == "logits":
        assert "the training loss over the fit's data is nan" in skipped[0], skipped[0]
    else:  # a factor with Inf is never decomposed (eigh would raise or give NaN, by platform)
        assert "NaN or Inf" in skipped[0], skipped[0]
    assert any("final Laplace approximation is not finite" in m for m in messages)

    assert trainer.marglik_update_steps == [2, 6] and trainer.marglik_skipped_steps == [4, 8]
    p = spy.precisions  # p[s]: the prior precision after step s
    assert not torch.equal(p[2], p[1])  # the update at step 2 moved it
    assert torch.equal(p[4], p[3])  # the skipped update at step 4 did not
    assert not torch.equal(p[6], p[5])
    assert torch.equal(trainer.marglik_loop.hyper.prior_precision, p[7])
    assert len(trainer.margliks) == 2 * 3 and all(math.isfinite(v) for v in trainer.margliks)

    lap = trainer.laplace  # the final fit was not finite: no NaN posterior is kept
    _check_without_posterior(lap, trainer.model, trainer.marglik_loop.hyper.prior_precision)
    assert "final fit at step 8" in lap.fit_error
    assert all(torch.isfinite(q).all() for q in trainer.model.parameters())
    assert _all_finite(trainer.state.log_history)
    assert [e["step"] for e in trainer.state.log_history if "marglik_skipped" in e] == [4, 8]
    trainer.model.fault = None
    metrics = trainer.evaluate(_data())  # the MAP's metrics; the Laplace ones left out
    assert "eval_loss" in metrics and not any("laplace" in k for k in metrics), metrics
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "laplace_config.json").exists()
    saved = json.loads((tmp_path / "final" / HYPERPARAMETERS_NAME).read_text())
    assert _all_finite(saved) and saved["log_marglik"] == trainer.best_marglik
    assert saved["prior_precision"] == trainer.marglik_loop.hyper.prior_precision.tolist()
    for step in (2, 4, 6, 8):
        state = torch.load(tmp_path / "out" / f"checkpoint-{step}" / STATE_NAME, weights_only=True)
        assert _all_finite(state), step
        assert state["loop"]["skipped_steps"] == [s for s in (4, 8) if s <= step]


def _check_without_posterior(lap, model, learned: torch.Tensor) -> None:
    """``lap`` carries the learned prior precision and the MAP (the model's parameters), and its
    posterior methods raise an error that names the fault and what to try."""
    assert lap.fit_error and lap.posterior is None
    torch.testing.assert_close(lap.prior_precision, learned, rtol=1e-15, atol=0)  # exp(log δ)
    theta = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    assert torch.equal(lap.mean, theta) and lap.model is model
    x = {"input_ids": torch.zeros(2, 3, dtype=torch.float64)}
    calls = {
        "log_marginal_likelihood": lambda: lap.log_marginal_likelihood(),
        "__call__": lambda: lap(x),
        "predictive_samples": lambda: lap.predictive_samples(x, n_samples=2),
        "sample": lambda: lap.sample(2),
        "posterior_covariance": lambda: lap.posterior_covariance,
        "posterior_precision": lambda: lap.posterior_precision,
        "functional_variance": lambda: lap.functional_variance(torch.zeros(1, 2, lap.n_params)),
        "log_det_ratio": lambda: lap.log_det_ratio,
        "scatter": lambda: lap.scatter,
        "optimize_prior_precision": lambda: lap.optimize_prior_precision(n_steps=1),
        "save_pretrained": lambda: lap.save_pretrained("never_written"),
    }
    for name, call in calls.items():
        with pytest.raises(NonFiniteFitError) as err:
            call()
        text = str(err.value)
        assert lap.fit_error in text and "smaller learning rate" in text, name
        assert "prior_prec_init" in text and "float32" in text and "backend='ggn'" in text
    assert not os.path.exists("never_written")


@pytest.mark.filterwarnings("ignore:n_epochs_burnin=3 exceeds")
@pytest.mark.parametrize("outcome", ["raises", "nan"])
def test_marglik_training_non_finite_final_fit_returns_the_map(monkeypatch, outcome):
    """No update falls within training (burn-in), so the final fit is a new one, and its
    eigendecomposition fails (raises, or gives NaN): marglik_training warns and returns a
    Laplace without a posterior, with the hyperparameters (the initial ones: no update) and the
    trained parameters, whose posterior methods raise."""
    from hf_marglik import marglik_training

    monkeypatch.setattr(torch.linalg, "eigh", _FailingEigh(outcome, 1, 4))
    data = _data()
    loader = [
        {"input_ids": torch.stack([data[i]["input_ids"] for i in range(j, j + 8)]),
         "labels": torch.stack([data[i]["labels"] for i in range(j, j + 8)])}
        for j in (0, 8)
    ]  # fmt: skip
    with pytest.warns(RuntimeWarning, match="final Laplace approximation is not finite"):
        lap, model, margliks, _ = marglik_training(
            FaultyMLP().double(), loader, n_epochs=2, n_epochs_burnin=3, prior_prec_init=3.0
        )
    assert margliks == []
    _check_without_posterior(lap, model, torch.full((4,), 3.0, dtype=torch.float64))
    expected = "failed" if outcome == "raises" else "NaN or Inf"
    assert expected in lap.fit_error, lap.fit_error


class _FailingEigh:
    """``torch.linalg.eigh`` that fails on the 2-d (K-FAC factor) calls number ``first`` to
    ``last`` (1-based): by raising ``LinAlgError`` (as ``eigh`` of a bad matrix does on some
    CPUs) or by returning NaN (as it does on others). Batched calls pass through."""

    def __init__(self, outcome: str, first: int, last: int):
        self.real, self.outcome, self.first, self.last = torch.linalg.eigh, outcome, first, last
        self.calls = 0

    def __call__(self, M, *args, **kwargs):
        lam, Q = self.real(M, *args, **kwargs)
        if M.ndim != 2:
            return lam, Q
        self.calls += 1
        if self.first <= self.calls <= self.last:
            if self.outcome == "raises":
                raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
            return torch.full_like(lam, math.nan), torch.full_like(Q, math.nan)
        return lam, Q


@pytest.mark.parametrize("outcome", ["raises", "nan"])
@pytest.mark.parametrize("driver", ["marglik_training", "trainer"])
def test_failed_eigendecomposition_skips_the_update(tmp_path, monkeypatch, driver, outcome):
    """The second of three fits fails in eigh (4 factors per fit: calls 5–8; a raise ends the
    fit at call 5), both ways it can fail: marglik_training and MargLikTrainer (one loop) skip
    that update with a warning, keep the hyperparameters, and end with a finite model and
    posterior."""
    last = 5 if outcome == "raises" else 8
    monkeypatch.setattr(torch.linalg, "eigh", _FailingEigh(outcome, 5, last))
    if driver == "marglik_training":
        from hf_marglik import marglik_training

        data = _data()
        loader = [
            {"input_ids": torch.stack([data[i]["input_ids"] for i in range(j, j + 8)]),
             "labels": torch.stack([data[i]["labels"] for i in range(j, j + 8)])}
            for j in (0, 8)
        ]  # fmt: skip
        with pytest.warns(RuntimeWarning, match="Skipping the hyperparameter update at step 2"):
            lap, model, margliks, _ = marglik_training(
                FaultyMLP().double(), loader, n_epochs=3, n_hypersteps=3
            )
        assert len(margliks) == 2 * 3
    else:
        trainer = MargLikTrainer(
            model=FaultyMLP().double(),
            args=_args(tmp_path / "out", num_train_epochs=3),
            train_dataset=_data(),
        )
        with pytest.warns(RuntimeWarning, match="Skipping the hyperparameter update at step 4"):
            trainer.train()
        assert trainer.marglik_update_steps == [2, 6] and trainer.marglik_skipped_steps == [4]
        lap, model, margliks = trainer.laplace, trainer.model, trainer.margliks
    assert all(math.isfinite(v) for v in margliks)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(lap.prior_precision).all()
    assert torch.isfinite(lap.log_marginal_likelihood())


def test_hyper_step_to_infinite_precision_is_skipped(tmp_path):
    """An Adam step of 1e5 on log δ makes δ = exp(±1e5) = inf or 0: rejected, δ stays at its
    initial value; the evaluated value is logged, with the count of clipped eigenvalues."""
    trainer = MargLikTrainer(
        model=FaultyMLP().double(),
        args=_args(tmp_path / "out", num_train_epochs=1, lr_hyp=1e5, prior_prec_init=2.0),
        train_dataset=_data(),
    )
    with pytest.warns(RuntimeWarning, match="would make a precision or the noise 0 or infinite"):
        trainer.train()
    assert torch.equal(
        trainer.marglik_loop.hyper.prior_precision, torch.full((4,), 2.0, dtype=torch.float64)
    )
    assert trainer.marglik_update_steps == [2] and len(trainer.margliks) == 1
    (log,) = [e for e in trainer.state.log_history if "marglik" in e]
    assert log["prior_prec_min"] == log["prior_prec_max"] == 2.0
    assert log["marglik_n_clipped"] == trainer.laplace.n_clipped
    assert torch.equal(
        trainer.marglik_loop.best.prior_precision, trainer.marglik_loop.hyper.prior_precision
    )


def test_rejected_later_hyper_step_keeps_evaluated_values_current():
    """Step 1 moves log δ from 400 to 700 (δ finite), step 2 would reach 1000 (δ = inf) and is
    rejected: δ stays exp(700), and the values recorded for that evaluation (the ones the best
    model is saved with) are exp(700), the current ones, not step 1's."""
    from hf_marglik.hyper import HyperOptimizer

    class LogPrior:  # log p(D | δ) = Σ log δ: Adam raises log δ by lr per step
        def log_marginal_likelihood(self, prior_precision, sigma_noise=None):
            return torch.log(prior_precision).sum()

    h = HyperOptimizer([2], "classification", "scalar", lr_hyp=300.0, dtype=torch.float64)
    with torch.no_grad():
        h.log_prior_prec.fill_(400.0)
    with pytest.warns(RuntimeWarning, match="0 or infinite"):
        values = h.step(LogPrior(), 5)
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
    assert float(h.log_prior_prec.detach()) == pytest.approx(700.0)
    assert torch.equal(h.evaluated_prior_precision, h.prior_precision)
    assert values[-1] == pytest.approx(-700.0)


def test_clipped_eigenvalues_are_logged(tmp_path, monkeypatch):
    """Negative K-FAC eigenvalues (from rounding) are clipped to 0 and counted in
    ``marglik_n_clipped``, equal to the fit's own count. Whether rounding makes an eigenvalue of
    a singular factor negative depends on the CPU, so the case is forced: every factor's
    ``eigh`` returns its smallest eigenvalue negated (4 factors per fit: B and A of 2 layers)."""
    real_eigh = torch.linalg.eigh

    def eigh_with_a_negative(M, *args, **kwargs):
        lam, Q = real_eigh(M, *args, **kwargs)
        if M.ndim == 2:  # a K-FAC factor (the softmax Hessian roots are batched)
            lam = lam.clone()
            lam[0] = -lam[0].abs() - 1e-12
        return lam, Q

    monkeypatch.setattr(torch.linalg, "eigh", eigh_with_a_negative)
    seen = []

    class Spy(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "marglik" in logs:
                seen.append((logs["marglik_n_clipped"], trainer.laplace.n_clipped))

    trainer = MargLikTrainer(
        model=FaultyMLP().double(),
        args=_args(tmp_path / "out", num_train_epochs=3),
        train_dataset=_data(),
        callbacks=[Spy()],
    )
    trainer.train()
    assert seen == [(4, 4)] * 3
    for i in range(len(trainer.laplace.sizes)):  # clipped to 0, not kept negative
        assert trainer.laplace.posterior.block_eigenvalues(i).min() >= 0


# ============================================================================ bad input
def _frozen():
    return FaultyMLP().double().requires_grad_(False)


def _wide():  # one weight of 100·100 = 10,000 parameters: over a dense block's limit
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 100), nn.Tanh(), nn.Linear(100, 100), nn.Linear(100, 2))


class _Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _wide().double()

    def forward(self, input_ids):
        return self.net(input_ids)


def _no_key(key):
    return DictDataset([{k: v for k, v in item.items() if k != key} for item in _data().items])


# name: (args overrides, model builder, dataset builder, exception, substrings of the message)
TRAINER_BAD = {
    "unknown_likelihood": ({"likelihood": "clasification"}, None, None, ValueError,
                           ["likelihood='clasification' is not valid", "'classification'"]),
    "unknown_structure": ({"prior_structure": "layer"}, None, None, ValueError,
                          ["prior_structure='layer'", "'layerwise'"]),
    "prior_prec_init_zero": ({"prior_prec_init": 0.0}, None, None, ValueError,
                             ["prior_prec_init=0.0 is invalid", "positive"]),
    "prior_prec_init_negative": ({"prior_prec_init": -1.0}, None, None, ValueError,
                                 ["prior_prec_init=-1.0"]),
    "temperature_zero": ({"temperature": 0.0}, None, None, ValueError,
                         ["temperature=0.0 is invalid"]),
    "temperature_negative": ({"temperature": -2.0}, None, None, ValueError,
                             ["temperature=-2.0 is invalid"]),
    "lr_hyp_nan": ({"lr_hyp": float("nan")}, None, None, ValueError, ["lr_hyp=nan"]),
    "no_trainable_parameters": ({}, _frozen, None, ValueError, ["no trainable parameters"]),
    "missing_labels_key": ({}, None, lambda: _no_key("labels"), KeyError,
                           ["no targets under dict_key_y='labels'", "'input_ids'"]),
    "missing_inputs_key": ({}, None, lambda: _no_key("input_ids"), KeyError,
                           ["no inputs under dict_key_x='input_ids'"]),
    "empty_dataset": ({}, None, lambda: DictDataset([]), ValueError,
                      ["training dataset is empty"]),
    "labels_out_of_range": ({}, None, lambda: _data(labels=[0, 1, 2, 5] * 4), ValueError,
                            ["Labels must lie in [0, 1]", "[0, 5]", "num_labels"]),
    "negative_labels": ({}, None, lambda: _data(labels=[0, 1, -1, 1] * 4), ValueError,
                        ["Labels must lie in [0, 1]", "-100"]),
    "all_labels_ignored": ({}, None, lambda: _data(labels=[-100] * 16), ValueError,
                           ["no data points", "-100"]),
    "regression_with_class_labels": ({"likelihood": "regression"}, None, None, ValueError,
                                     ["likelihood='regression'", "(8, 2)", "(8,)"]),
    "causal_lm_with_classifier": ({"likelihood": "causal_lm"}, None, None, ValueError,
                                  ["likelihood='causal_lm' needs logits (batch, seq, vocab)"]),
    "diag_prior_on_wide_kron_block": ({"prior_structure": "diag"}, _Wide, None, ValueError,
                                      ["prior_structure='diag'", "net.2.weight", "10000"]),
}  # fmt: skip


def _output_dir_snapshot(out: Path) -> dict:
    return {
        str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def _prepared_output_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "results.txt").write_text("a previous run's results\n")
    (out / "checkpoint-1" / STATE_NAME).write_bytes(b"a previous run's state")
    return out


@pytest.mark.parametrize("case", sorted(TRAINER_BAD))
def test_trainer_bad_input(case, tmp_path):
    """The error names the problem and comes before the first optimizer step; output_dir (a
    previous run's files) is untouched."""
    overrides, build_model, build_data, error, expected = TRAINER_BAD[case]
    out = _prepared_output_dir(tmp_path)
    before = _output_dir_snapshot(out)
    steps = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    with pytest.raises(error) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = _args(out, num_train_epochs=1, **overrides)
        model = (build_model or FaultyMLP)().double()
        data = (build_data or _data)()
        MargLikTrainer(model=model, args=args, train_dataset=data, callbacks=[Steps()]).train()
    assert steps == []  # found before the first optimizer step
    message = str(info.value.args[0]) if error is KeyError else str(info.value)
    for piece in expected:
        assert piece in message, (piece, message)
    assert _output_dir_snapshot(out) == before


def _csv(path: Path, rows: list[str]) -> str:
    path.write_text("\n".join(["text,label", *rows]) + "\n")
    return str(path)


def _yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# name: (argv builder given a folder, substrings of the one-line message). Rows that
# tests/test_train_script.py has (unknown flag / key, missing column, num_labels too small,
# sequence too long, likelihood vs task) are not repeated.
SCRIPT_BAD = {
    "cli_wrong_type": (lambda p: ["--lora_r", "four"], ["--lora_r", "invalid int value: 'four'"]),
    "yaml_string_for_int": (lambda p: ["--config", _yaml(p / "c.yaml", "lora_r: four\n")],
                            ["lora_r: 'four' is not valid", "an integer"]),
    "yaml_list_for_number": (lambda p: ["--config", _yaml(p / "c.yaml", "num_train_epochs: [1]\n")],
                             ["num_train_epochs: [1] is not valid", "a number"]),
    "yaml_string_for_list": (lambda p: ["--config",
                                        _yaml(p / "c.yaml", "lora_target_modules: query\n")],
                             ["lora_target_modules", "a list of strings", "[a, b]"]),
    "yaml_null": (lambda p: ["--config", _yaml(p / "c.yaml", "learning_rate: null\n")],
                  ["learning_rate: null", "cannot be null"]),
    "yaml_not_bool": (lambda p: ["--config", _yaml(p / "c.yaml", "marglik: maybe\n")],
                      ["marglik: 'maybe'", "true or false"]),
    "empty_dataset": (lambda p: ["--train_file", _csv(p / "empty.csv", [])],
                      ["empty.csv", "has no examples"]),
    "all_labels_ignored": (lambda p: ["--train_file",
                                      _csv(p / "d.csv", [f"text {i},-100" for i in range(30)])],
                           ["Every label of the", "is -100", "--label_column"]),
    "modules_to_save_unknown": (lambda p: ["--lora_modules_to_save", "clasifier"],
                                ["no module 'clasifier'", "frozen", "'classifier'"]),
    "prior_prec_init_zero": (lambda p: ["--marglik", "--prior_prec_init", "0"],
                             ["prior_prec_init=0.0 is invalid"]),
    "temperature_negative": (lambda p: ["--marglik", "--temperature", "-1"],
                             ["temperature=-1.0 is invalid"]),
    "full_hessian_too_large": (lambda p: ["--marglik", "--hessian_structure", "full"],
                               ["hessian_structure='full'", "75,653", "'kron'"]),
    "diag_prior_on_wide_block": (lambda p: ["--marglik", "--prior_structure", "diag",
                                            "--lora_r", "64"],
                                 ["prior_structure='diag'", "limit 8192", "'layerwise'"]),
    "resume_without_checkpoint": (lambda p: ["--marglik", "--resume_from_checkpoint", "true"],
                                  ["resume_from_checkpoint=true", "checkpoint-1",
                                   "lack marglik_state.pt"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SCRIPT_BAD))
def test_train_script_bad_input(case, tmp_path, capsys, monkeypatch):
    """``main(argv)`` in-process: status 2, one ``train.py: error:`` line naming the problem,
    the previous run's files in output_dir untouched and nothing added."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train = _load_train_script()
    make_argv, expected = SCRIPT_BAD[case]
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "metrics.json").write_text('{"a previous run": true}\n')
    (out / "checkpoint-1" / "trainer_state.json").write_text("{}\n")
    before = _output_dir_snapshot(out)
    rc = train.main([*make_argv(tmp_path), *TRAIN_TINY, "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2, err
    assert err.startswith("train.py: error:"), err
    for piece in expected:
        assert piece in err, (piece, err)
    assert _output_dir_snapshot(out) == before


def _load_train_script():
    spec = importlib.util.spec_from_file_location("train_script", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ============================================================================ interruptions
def _checkpoints(out: Path) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The worker's run without interruption, in this process."""
    trainer = W.make_trainer(str(tmp_path_factory.mktemp("uninterrupted") / "out"))
    trainer.train()
    assert trainer.marglik_update_steps == [3, 6, 9]
    return W.result(trainer)


def _resume(out: Path, **kw) -> dict:
    trainer = W.make_trainer(str(out), **kw)
    handler = signal.getsignal(signal.SIGTERM)
    trainer.train(resume_from_checkpoint=True)
    assert signal.getsignal(signal.SIGTERM) is handler  # MargLikTrainer restored it
    return W.result(trainer)


def test_process_sigkill_in_curvature_fit(background, uninterrupted):
    """SIGKILL inside the curvature fit of step 6: checkpoints 1–5 exist. A kill while saving
    checkpoint 5 would leave it without marglik_state.pt (written last) and a kill inside a
    write a stray marglik_state.pt.tmp: both are made here too. Resuming with True skips the
    incomplete checkpoint with a warning, never reads the stray file (garbage, which torch.load
    would reject) and ends exactly as the uninterrupted run."""
    background.wait_marker("kill_fit")
    proc = background.procs["kill_fit"]
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    out = background.tmp / "kill_fit"
    assert _checkpoints(out) == [f"checkpoint-{s}" for s in range(1, 6)]
    os.remove(out / "checkpoint-5" / STATE_NAME)
    (out / "checkpoint-4" / (STATE_NAME + ".tmp")).write_bytes(b"half-written \x00\x01")
    with pytest.warns(UserWarning, match="Skipping incomplete checkpoint.*checkpoint-5"):
        resumed = _resume(out)
    assert resumed == uninterrupted


def test_process_sigkill_in_hyper_update(background, uninterrupted):
    """SIGKILL in the third hyper-step of the update at step 6 (two Adam steps had changed the
    precision in memory): the resumed run repeats that update from checkpoint 5 and ends exactly
    as the uninterrupted run."""
    background.wait_marker("kill_hyper")
    proc = background.procs["kill_hyper"]
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    out = background.tmp / "kill_hyper"
    assert _checkpoints(out)[-1] == "checkpoint-5"
    state = torch.load(out / "checkpoint-5" / STATE_NAME, weights_only=True)
    assert state["loop"]["update_steps"] == [3]
    assert _resume(out) == uninterrupted


def test_process_sigterm_checkpoints_and_resumes(background, uninterrupted):
    """SIGTERM inside the update at step 6, no periodic checkpoints: the update finishes, the
    trainer writes checkpoint-6 (with that update) and stops, the process exits with 143 and
    no traceback; resuming from it ends exactly as the uninterrupted run."""
    background.wait_marker("term_hyper")
    proc = background.procs["term_hyper"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == SIGTERM_EXIT_CODE
    out = background.tmp / "term_hyper"
    assert "Traceback" not in background.output("term_hyper")[1]
    assert json.loads((out / "result.json").read_text()) == {"stopped_at": 6}
    assert _checkpoints(out) == ["checkpoint-6"]
    state = torch.load(out / "checkpoint-6" / STATE_NAME, weights_only=True)
    assert state["loop"]["update_steps"] == [3, 6] and len(state["loop"]["margliks"]) == 2 * 5
    assert _resume(out, save=False) == uninterrupted


def test_process_train_script_sigterm(background):
    """scripts/train.py --marglik gets SIGTERM after its first logged step (72 steps in all):
    it saves checkpoint-<step> (with the marglik state), says how to resume, exits with 143
    without a traceback, and writes no final outputs."""
    name = "train_py"  # the SIGTERM comes from Background.sigterm_after_first_step
    assert background.procs[name].wait(timeout=300) == SIGTERM_EXIT_CODE
    err = background.output(name)[1]
    assert "Traceback" not in err
    found = re.search(
        r"stopped by SIGTERM after step (\d+); checkpoint saved in (\S+)\. Resume", err
    )
    assert found, err
    step, folder = int(found.group(1)), Path(found.group(2))
    assert 1 <= step < 72 and folder == background.tmp / name / f"checkpoint-{step}"
    assert (folder / STATE_NAME).is_file() and (folder / "trainer_state.json").is_file()
    assert "--resume_from_checkpoint true" in err
    assert not (background.tmp / name / "metrics.json").exists()


def test_process_train_script_bad_input(background):
    """A real process: a wrong type in the YAML gives status 2, one line naming the key, the
    value and the type, no traceback, and no output_dir."""
    proc = background.procs["train_py_bad"]
    assert proc.wait(timeout=300) == 2
    err = background.output("train_py_bad")[1]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("train.py: error: Config file")
    assert "lora_r: 'four' is not valid; lora_r takes an integer" in err
    assert not (background.tmp / "train_py_bad").exists()


def test_sigterm_callback_with_plain_trainer(tmp_path):
    """The public callback on a plain transformers.Trainer (as train.py uses it without
    --marglik): a SIGTERM raised in step 2 (here, in-process) saves checkpoint-2 at that step's
    end and stops; the previous SIGTERM handler is back afterwards. transformers'
    enable_jit_checkpoint becomes save_on_sigterm for MargLikTrainer."""
    from transformers import Trainer, TrainingArguments

    from hf_marglik.preemption import SigtermCheckpointCallback

    class Model(FaultyMLP):
        def forward(self, input_ids, labels=None):
            logits = super().forward(input_ids)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    class RaiseAtStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:  # step 2 is running
                signal.raise_signal(signal.SIGTERM)

    stop = SigtermCheckpointCallback()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
        num_train_epochs=2,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=Model().double(), args=args, train_dataset=_data(), callbacks=[RaiseAtStep2(), stop]
    )
    handler = signal.getsignal(signal.SIGTERM)
    with stop:
        trainer.train()
    assert signal.getsignal(signal.SIGTERM) is handler
    assert stop.stopped_at == 2 and trainer.state.global_step == 2
    assert _checkpoints(tmp_path / "out") == ["checkpoint-2"]

    with pytest.warns(UserWarning, match="enable_jit_checkpoint is replaced by save_on_sigterm"):
        a = _args(tmp_path, enable_jit_checkpoint=True, save_on_sigterm=False)
    assert a.save_on_sigterm and not a.enable_jit_checkpoint
