"""The study's records on disk (:mod:`hf_marglik.recipe.study`): one folder per training run
or post-hoc job, how a finished one is told from an interrupted one, and how each is made.

- A **training run** folder is ``scripts/train.py``'s ``output_dir``, with ``train.log`` (the
  command line and all output). After train.py exits 0 with its ``metrics.json``,
  ``study_run.json`` is written (to a temporary name, then renamed): the command, the spec, the
  wall time and the CPU time of the child (user + sys, ``RUSAGE_CHILDREN``), host, git commit.
  Its presence marks the run finished. The child is started with ``PR_SET_PDEATHSIG`` (Linux):
  killed with the study, it writes nothing afterwards.
- A **post-hoc job** runs in this process; its folder is written under a ``.tmp`` name and
  renamed into place when complete (``result.json``, ``probs.pt``, ``job.log``), so it exists
  only complete. Its ``timing`` is the wall time and ``time.process_time`` of the job.
- Every record holds its ``spec``; a finished folder whose spec differs from the plan's is
  refused (:class:`StudyError`), never overwritten.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RUN_RECORD = "study_run.json"
JOB_RESULT = "result.json"
JOB_TENSORS = "probs.pt"
JOB_LOG = "job.log"
TRAIN_LOG = "train.log"
LOCK_NAME = ".study.lock"


class StudyError(ValueError):
    """A bad input to the study (names, seeds, a folder of another study), found before anything
    is written; ``compare.py`` prints it in one line and exits with status 2."""


class RunFailed(RuntimeError):
    """A training run or post-hoc job failed; what finished stays recorded."""


def read_json(path: Path):
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path, value) -> None:
    """Write ``value`` to ``path`` atomically (a temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    os.replace(tmp, path)


@dataclass
class RunRecord:
    folder: Path
    record: dict  # study_run.json
    metrics: dict  # train.py's metrics.json

    def test_probs(self, read: str):
        """``(probs, labels)`` of the test split from the run's ``--save_predictions``: the
        MAP's softmax (``read="test"``) or the Laplace predictive (``"test_laplace"``; None if
        absent)."""
        import torch

        from .report import load_predictions

        p = load_predictions(self.folder)
        if read == "test":
            return torch.softmax(p["test"]["logits"].double(), -1), p["test"]["labels"]
        if p.get(read) is None:
            return None
        return p[read]["probs"], p[read]["labels"]


@dataclass
class JobRecord:
    folder: Path
    result: dict  # result.json

    def tensors(self) -> dict:
        import torch

        return torch.load(self.folder / JOB_TENSORS, weights_only=False)


def folder_state(folder: Path, spec: dict, is_run: bool) -> str:
    """``done``, ``partial`` or ``todo`` (see the module docstring)."""
    if not folder.exists():
        return "todo"
    record = read_json(folder / (RUN_RECORD if is_run else JOB_RESULT))
    if record is None or (is_run and read_json(folder / "metrics.json") is None):
        return "partial"
    if record.get("spec") != spec:
        raise StudyError(
            f"{folder} was recorded with {json.dumps(record.get('spec'))}, not "
            f"{json.dumps(spec)}: it belongs to another study. Use a new --out folder."
        )
    return "done"


def load(folder: Path, is_run: bool) -> RunRecord | JobRecord:
    if is_run:
        return RunRecord(folder, read_json(folder / RUN_RECORD), read_json(folder / "metrics.json"))
    return JobRecord(folder, read_json(folder / JOB_RESULT))


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def git_commit(root: Path) -> str | None:
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() or None


def _die_with_parent() -> None:  # in the child, before exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _last_error_line(log: Path) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("train.py: error:")]
    return (errors or lines or ["(no output)"])[-1]


def run_training(label: str, folder: Path, argv: list[str], spec: dict, cwd: Path) -> None:
    """Run ``argv`` (``scripts/train.py ... --output_dir folder``) in a subprocess, its output
    in ``folder/train.log``, then write ``study_run.json``. train.py's exit status 2 (a bad
    input) is a :class:`StudyError`, any other failure a :class:`RunFailed`."""
    folder.mkdir(parents=True)
    log = folder / TRAIN_LOG
    wall, cpu = time.perf_counter(), _children_cpu()
    with open(log, "w") as f:
        f.write(" ".join(argv) + "\n")
        f.flush()
        proc = subprocess.run(
            argv,
            cwd=cwd,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    timing = {"wall_s": time.perf_counter() - wall, "cpu_s": _children_cpu() - cpu}
    if proc.returncode == 2:
        raise StudyError(f"{label}: {_last_error_line(log)} (log: {log})")
    if proc.returncode != 0 or read_json(folder / "metrics.json") is None:
        raise RunFailed(
            f"{label} failed (exit status {proc.returncode}); see {log}. What finished is kept: "
            "rerun the same command to retry."
        )
    record = {
        "spec": spec,
        "argv": argv,
        "timing": timing,
        "finished": _now(),
        "host": socket.gethostname(),
        "git_commit": git_commit(cwd),
    }
    write_json(folder / RUN_RECORD, record)


def run_job(label: str, folder: Path, spec: dict, compute: Callable[[], tuple[dict, dict]]):
    """``compute()`` -> ``(result, tensors)`` with its output in ``job.log``, written under a
    temporary folder that is renamed to ``folder`` when complete."""
    import torch

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():  # left by a killed study
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    log = tmp / JOB_LOG
    wall, cpu = time.perf_counter(), time.process_time()
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            result, tensors = compute()
        except Exception as e:
            traceback.print_exc(file=f)
            raise RunFailed(
                f"{label} failed ({type(e).__name__}: {e}); see {log}. What finished is kept: "
                "rerun the same command to retry."
            ) from e
    result["timing"] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    result["spec"] = spec
    result["finished"] = _now()
    torch.save(tensors, tmp / JOB_TENSORS)
    write_json(tmp / JOB_RESULT, result)
    os.replace(tmp, folder)


@contextlib.contextmanager
def locked(out: Path):
    """One study at a time per folder (an exclusive ``flock`` on ``out/.study.lock``)."""
    import fcntl

    with open(out / LOCK_NAME, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StudyError(
                f"another compare.py is running on {str(out)!r}; wait for it or use another --out."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
