"""MargLikTrainer data-parallel over 2 CPU processes (gloo, torch.distributed.run) equals one
process with the same global batch: curvature, log marginal likelihood, hyperparameters and
parameters agree to float rounding, and every process holds the same hyperparameters. A
checkpoint written by either resumes on the other number of processes to the same end."""

import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, tmp, subset=None, backend="ggn"):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env["HF_MARGLIK_TEST_BACKEND"] = backend
    if subset == "online":
        env["HF_MARGLIK_TEST_ONLINE"] = "1"
    elif subset == "gridsearch":
        env["HF_MARGLIK_TEST_GRIDSEARCH"] = "1"
    elif subset is not None:
        env["HF_MARGLIK_TEST_SUBSET"] = str(subset)
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _close(a, b, rtol=1e-10, atol=1e-12):
    a, b = list(a) if isinstance(a, list) else [a], list(b) if isinstance(b, list) else [b]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=rtol, abs=atol)


@pytest.mark.parametrize("subset, backend", [(None, "ggn-mc"), (0.5, "ggn"), ("online", "ggn-mc")])
def test_two_processes_equal_one_process(tmp_path, subset, backend):
    """``subset=0.5``: curvature-weighted subsets (each process records the curvature of its
    shard; the scores are gathered, so every process draws the same subset). ``"online"``: the
    curvature gathered from the training steps, summed over the processes at each update.
    ``"ggn-mc"`` (the default Monte-Carlo GGN, in a pass and online): each example's sampled
    labels are keyed by its hash and the step, not by the process, so 2 processes draw the same
    labels as 1 (the model has no dropout: dropout masks are drawn per process)."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    _run([sys.executable, WORKER, str(single), "8"], tmp_path, subset, backend)
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={_free_port()}",
            WORKER,
            str(multi),
            "4",
        ],
        tmp_path,
        subset,
        backend,
    )
    ref = json.loads((single / "result-0.json").read_text())
    ranks = [json.loads((multi / f"result-{r}.json").read_text()) for r in range(2)]
    assert ref["world_size"] == 1 and [r["world_size"] for r in ranks] == [2, 2]
    assert ref["n_data"] == 24
    assert len(ref["margliks"]) == 3 * 5
    subset_scores = subset == 0.5
    assert ref["scores"] == (24 if subset_scores else 0)  # every example's curvature recorded
    for got in ranks:
        assert got["n_data"] == ref["n_data"]
        # its shards of the three epochs (reshuffled each epoch); gathered before each draw
        assert 12 <= got["scores"] <= 24 if subset_scores else got["scores"] == 0
        for key in ("margliks", "losses", "prior_precision", "log_marglik", "curvature", "params"):
            _close(got[key], ref[key])
    # every process holds exactly the same hyperparameters
    assert ranks[0]["prior_precision"] == ranks[1]["prior_precision"]


def _check_same(got, ref):
    for key in ("losses", "prior_precision", "log_marglik", "curvature", "params"):
        _close(got[key], ref[key])


def test_checkpoints_written_once_resume_on_another_process_count(tmp_path):
    """Checkpoint-6 (end of epoch 2 of 3) of a 2-process run resumes in 1 process, and that of a
    1-process run in 2 processes; both end where an uninterrupted run ends. Our state file is
    written by the main process only (one file, no partial ``.tmp`` left)."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    from_multi, from_single = tmp_path / "from_multi", tmp_path / "from_single"
    for d in (single, multi, from_multi, from_single):
        d.mkdir()
    port = f"--master_port={_free_port()}"
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", port, WORKER]
    _run([sys.executable, WORKER, str(single), "8"], tmp_path)
    _run(ddp + [str(multi), "4"], tmp_path)
    for run in (single, multi):
        ckpt = run / "run" / "checkpoint-6"
        assert (ckpt / "marglik_state.pt").is_file()
        assert not [f for f in os.listdir(ckpt) if f.endswith(".tmp")]
    _run(
        [sys.executable, WORKER, str(from_multi), "8", str(multi / "run" / "checkpoint-6")],
        tmp_path,
    )
    port = f"--master_port={_free_port()}"
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", port, WORKER]
    _run(ddp + [str(from_single), "4", str(single / "run" / "checkpoint-6")], tmp_path)
    ref = json.loads((single / "result-0.json").read_text())
    _check_same(json.loads((from_multi / "result-0.json").read_text()), ref)
    for r in range(2):
        _check_same(json.loads((from_single / f"result-{r}.json").read_text()), ref)


def test_predictive_prior_gridsearch_and_eval_metrics_over_the_whole_eval_split(tmp_path):
    """``predictive_prior="gridsearch"`` with 2 processes: the Trainer gives each process a
    shard of the eval split, and the candidates' losses are summed over the processes, so both
    choose the prior that one process chooses on the whole split. The worker's eval split is
    built so that each shard alone would choose differently (the MAP on one, the grid's lowest
    value on the other). ``evaluate()``'s MAP and Laplace metrics are gathered over the shards:
    those of the whole split on every process."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    _run([sys.executable, WORKER, str(single), "8"], tmp_path, "gridsearch")
    port = f"--master_port={_free_port()}"
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", port, WORKER]
    _run(ddp + [str(multi), "4"], tmp_path, "gridsearch")
    ref = json.loads((single / "result-0.json").read_text())
    k = [a / b for a, b in zip(ref["predictive_prior_precision"], ref["prior_precision"])]
    assert 1e-4 < k[0] < 1e4 and k[0] == pytest.approx(k[-1])  # an inner grid value
    for r in range(2):
        got = json.loads((multi / f"result-{r}.json").read_text())
        _close(got["prior_precision"], ref["prior_precision"])
        _close(got["predictive_prior_precision"], ref["predictive_prior_precision"])
        assert got["eval"].keys() == ref["eval"].keys() and len(ref["eval"]) == 8
        for key in ref["eval"]:
            _close(got["eval"][key], ref["eval"][key])
