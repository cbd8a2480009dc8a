"""benchmarks/gpu_check.py, the prepared one-GPU check: without CUDA it stops at once with a
message that says what to do; ``--dry-run`` runs every check and the three SmolLM2 variants on
the CPU at tiny sizes (a tiny random model behind the real tokenizer) and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_stops_with_a_clear_message(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert _script().main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--dry-run" in err
    assert not out.exists()


def test_dry_run_exercises_every_check_and_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "gpu_check.json"
    assert _script().main(["--dry-run", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    checks = {c["name"]: c for c in data["checks"]}
    assert list(checks) == [
        "laplace_device_vs_cpu", "bf16_autocast_step", "metrics_on_device", "qlora_4bit"
    ]  # fmt: skip
    qlora = importlib.util.find_spec("bitsandbytes") is not None
    for name, c in checks.items():
        assert c["ok"] is (None if name == "qlora_4bit" and not qlora else True), c
    assert checks["bf16_autocast_step"]["curvature_dtypes"] == ["torch.float32"]
    assert set(data["runs"]) == {"plain", "marglik", "marglik_4bit"}
    if not qlora:
        assert "skipped" in data["runs"].pop("marglik_4bit")
    for mode, r in data["runs"].items():
        assert "error" not in r, r
        assert r["n_steps"] == 2 and r["step_s_median"] > 0
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["n_test"] == 4
        assert r["step_peak_mib"] is None  # GPU memory: CUDA only
        if mode != "plain":
            assert r["fit_2_batches_peak_mib"] is None and r["neg_log_marglik_last"] is not None
    report = capsys.readouterr().out
    assert "all checks ok: True" in report and "marglik " in report
