"""Model selection by the evidence: ``MargLikTrainer.hyperparameter_search`` (optuna, a trainer
built with ``model_init``) and ``scripts/train.py --marglik --select``.

The search's choice is checked against the exact evidence: tiny float64 BERT-LoRA models of two
ranks and two target sets, the dense GGN (``hessian_structure="full"``, ``backend="ggn"``), the
Laplace log marginal likelihood recomputed densely in the test at each trial's kept model and
precisions. The recipe's selection runs on the ``tiny`` study settings (MiniLM, 16 articles ×
16 tokens, one epoch), with a kill after the first candidate and a rerun that trains only the
other.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from models import DictDataset, bert_lora_model, tiny_trainer_args
from references import dense_ggn, log_marglik, per_parameter

from hf_marglik.trainer import MargLikTrainer

optuna = pytest.importorskip("optuna", reason="pip install hf_marglik[search]")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet_optuna():
    # transformers' search calls gc.collect() several times per trial; with the objects of the
    # imports frozen out of the collector it takes milliseconds instead of seconds
    gc.freeze()
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)
    gc.unfreeze()


# ------------------------------------------------------------- the trainer's search
def _tokens(n=16, seq=6, vocab=20):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::4, -2:] = 0
    y = torch.randint(0, 3, (n,), generator=g)
    items = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i]} for i in range(n)]
    return DictDataset(items)


def _model_init(trial):
    """The trial's LoRA rank and target modules (rank 2 on query when the trainer is built)."""
    r = 2 if trial is None else trial.suggest_categorical("lora_r", [1, 4])
    targets = "query" if trial is None else trial.suggest_categorical("targets", ["query", "query+value"])  # fmt: skip
    return bert_lora_model(r=r, max_positions=16, targets=tuple(targets.split("+")))


class _Recording(MargLikTrainer):
    """Keeps each trial's model, learned precisions and objective (the search releases the
    trainer's model after each trial)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.runs = []

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        prec = self.laplace.prior_precision.clone()
        self.runs.append((self.model, prec, self.objective, self.best_marglik / self.n_data))
        return out


def _dense_evidence_per_datum(model, data, prec) -> float:
    batches = [{k: torch.stack([d[k] for d in data.items[i : i + 8]]) for k in data.items[0]}
               for i in range(0, len(data), 8)]  # fmt: skip
    ref = dense_ggn(model, batches, "classification")
    prior = per_parameter(prec.double(), ref.sizes)
    value = log_marglik(
        ref.H, ref.theta, prior, ref.loss, "classification", ref.n_data, ref.n_outputs
    )
    return float(value) / ref.n_data


def test_search_chooses_what_the_exact_evidence_chooses(tmp_path):
    """A grid of ranks × target sets: each trial's objective is the evidence per data point of
    the model its train() kept, as the dense formula gives it (no eval_dataset: the objective
    never evaluates); the search maximises it, so its best run is the dense argmax; every trial
    trains its own model_init(trial) model, and the trainer holds nothing of earlier ones.

    The kept model is the last one, trained a step past the last update (``marglik_steps=3`` of
    four steps, ``restore_best_marglik=False``): its evidence is not the best one seen during
    training, which the objective must not report."""
    data = _tokens()
    args = tiny_trainer_args(
        tmp_path / "out",
        hessian_structure="full",
        num_train_epochs=2,
        n_epochs_burnin=0,
        marglik_steps=3,
        restore_best_marglik=False,
        n_hypersteps=10,
        learning_rate=0.05,
    )
    trainer = _Recording(model_init=_model_init, args=args, train_dataset=data)
    storage = optuna.storages.InMemoryStorage()
    grid = {"lora_r": [1, 4], "targets": ["query", "query+value"]}
    best = trainer.hyperparameter_search(
        hp_space=lambda trial: {},
        n_trials=4,
        sampler=optuna.samplers.GridSampler(grid, seed=0),
        storage=storage,
        study_name="ranks",
    )
    study = optuna.load_study(study_name="ranks", storage=storage)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = sorted(study.trials, key=lambda t: t.number)
    assert len(trials) == len(trainer.runs) == 4
    assert {(t.params["lora_r"], t.params["targets"]) for t in trials} == {
        (r, t) for r in grid["lora_r"] for t in grid["targets"]
    }

    dense = []
    for t, (model, prec, objective, best_seen) in zip(trials, trainer.runs):
        r, targets = t.params["lora_r"], t.params["targets"].split("+")
        lora_a = {n: p for n, p in model.named_parameters() if "lora_A" in n}
        assert {n.split(".")[-4] for n in lora_a} == set(
            targets
        )  # ...<target>.lora_A.default.weight
        assert all(p.shape[0] == r for p in lora_a.values())
        exact = _dense_evidence_per_datum(model, data, prec)
        assert objective == pytest.approx(exact, rel=1e-9, abs=1e-12)
        assert t.value == objective
        assert abs(objective - best_seen) > 1e-6
        dense.append(exact)
    assert len({round(d, 9) for d in dense}) == 4  # distinct: the argmax means something
    chosen = max(range(4), key=lambda i: dense[i])
    assert best.run_id == str(trials[chosen].number)
    assert best.hyperparameters == trials[chosen].params
    # the state is the last trial's, on its model
    last_model = trainer.runs[-1][0]
    ids = {id(p) for p in last_model.parameters()}
    assert all(id(p) in ids for p in trainer.marglik_loop.params)
    assert len({id(run[0]) for run in trainer.runs}) == 4


def test_model_init_builds_each_run_with_frozen_lora_a(tmp_path):
    """train() rebuilds the model by model_init; freeze_lora_a freezes the new model's A factors
    before the optimizer is made, and the marginal-likelihood state covers the new model's
    trainable tensors only."""
    built = []

    def model_init():
        built.append(bert_lora_model(r=2, max_positions=16))
        return built[-1]

    args = tiny_trainer_args(tmp_path / "out", freeze_lora_a=True, num_train_epochs=1)
    trainer = MargLikTrainer(model_init=model_init, args=args, train_dataset=_tokens())
    a0 = {n: p.detach().clone() for n, p in built[0].named_parameters() if "lora_A" in n}
    trainer.train()
    assert len(built) == 2 and trainer.model is built[1]
    assert not any("lora_A" in n for n in trainer._names) and trainer._names
    own = {id(p) for p in built[1].parameters()}
    assert all(id(p) in own for p in trainer.marglik_loop.params)
    for n, p in built[1].named_parameters():
        if "lora_A" in n:
            assert not p.requires_grad and torch.equal(p, a0[n])  # same seed, never trained
    assert trainer.log_marglik_per_datum == pytest.approx(
        trainer.log_marglik / trainer.n_data, rel=1e-12
    )


def test_search_without_optuna_names_the_extra(tmp_path, monkeypatch):
    trainer = MargLikTrainer(
        model_init=lambda: bert_lora_model(r=1, max_positions=16),
        args=tiny_trainer_args(tmp_path / "out"),
        train_dataset=_tokens(),
    )
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    with pytest.raises(ImportError, match=r"pip install hf_marglik\[search\]"):
        trainer.hyperparameter_search(n_trials=1)


def test_search_snippet_runs(tmp_path, monkeypatch):
    """docs/trainer.md's snippet: MiniLM, model_init with the trial's LoRA rank, hp_space with
    the trial's learning rate, a grid of two."""
    from doc_snippets import snippet

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, page = snippet("hyperparameter_search")
    scope: dict = {}
    exec(compile(code, f"docs/{page}:hyperparameter_search", "exec"), scope)
    best, trainer = scope["best"], scope["trainer"]
    assert best.hyperparameters["lora_r"] in (4, 8)
    assert best.hyperparameters["learning_rate"] == trainer.args.learning_rate == 1e-3
    assert -10.0 < best.objective < 0.0  # a log marginal likelihood per article
    # each trial's checkpoint (the Trainer's run-<n> folder) holds the marglik state
    for n in range(2):
        assert list(Path("out", f"run-{n}").glob("checkpoint-*/marglik_state.pt")), n


# ------------------------------------------------------------- scripts/train.py --select
ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "--marglik --max_train_samples 16 --max_eval_samples 8 --max_test_samples 8 "
    "--max_seq_length 16 --num_train_epochs 1 --eval_strategy no --logging_steps 1 "
    "--lora_target_modules query --n_epochs_burnin 0 --n_hypersteps 5 --disable_tqdm true"
).split()  # the `tiny` study task's settings (hf_marglik/recipe/study.py)
SELECT = ["--select", "lora_r=1,2", "--select", "lora_target_modules=query+value"]


def _script():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Killed(Exception):
    """Stands for a SIGKILL in the middle of a candidate."""


@pytest.fixture(scope="module")
def selection(tmp_path_factory):
    """A two-candidate selection killed while training candidate 1 (its folder half written),
    then rerun with the same command."""
    recipe_run = importlib.import_module("hf_marglik.recipe.run")  # `recipe.run` is the function
    gc.freeze()
    out = tmp_path_factory.mktemp("select") / "out"
    argv = [*TINY, *SELECT, "--output_dir", str(out)]
    real = recipe_run.train_run
    trained = []

    def killed_at_candidate_1(cfg):
        folder = Path(cfg.training.output_dir)
        trained.append(folder.name)
        if len(trained) == 2:
            folder.mkdir(parents=True)
            (folder / "adapter_model.safetensors").write_text("half written")
            raise _Killed
        return real(cfg)

    script = _script()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(recipe_run, "train_run", killed_at_candidate_1)
        with pytest.raises(_Killed):
            script.main(argv)
        first = list(trained)
        done = (out / "candidates" / "0" / "metrics.json").stat().st_mtime_ns
        left = sorted(p.name for p in (out / "candidates").iterdir())
        marked = [(out / "candidates" / n / "candidate.json").is_file() for n in left]
        selection_after_kill = (out / "selection.json").exists()
        mp.setattr(recipe_run, "train_run", lambda cfg: trained.append(Path(cfg.training.output_dir).name) or real(cfg))  # fmt: skip
        rc = script.main(argv)
    gc.unfreeze()
    return {
        "out": out,
        "rc": rc,
        "first": first,
        "second": trained[len(first) :],
        "marked_after_kill": dict(zip(left, marked)),
        "selection_after_kill": selection_after_kill,
        "candidate_0_mtime": done,
    }


def test_select_resumes_with_the_candidates_left(selection):
    out = selection["out"]
    assert selection["first"] == ["0", "1"]
    assert selection["marked_after_kill"] == {"0": True, "1": False}
    assert not selection["selection_after_kill"]
    assert selection["rc"] == 0
    assert selection["second"] == ["1"]  # candidate 0 was finished: not trained again
    assert (out / "candidates" / "0" / "metrics.json").stat().st_mtime_ns == selection[
        "candidate_0_mtime"
    ]
    assert (out / "candidates" / "1" / "adapter_model.safetensors").read_bytes() != b"half written"


def test_select_keeps_the_highest_evidence_as_the_run_output(selection):
    out = selection["out"]
    sel = json.loads((out / "selection.json").read_text())
    cands = sel["candidates"]
    assert [c["settings"] for c in cands] == [
        {"lora_r": 1, "lora_target_modules": ["query", "value"]},
        {"lora_r": 2, "lora_target_modules": ["query", "value"]},
    ]
    for i, c in enumerate(cands):
        folder = out / "candidates" / str(i)
        adapter = json.loads((folder / "adapter_config.json").read_text())
        assert adapter["r"] == c["settings"]["lora_r"]
        assert sorted(adapter["target_modules"]) == ["query", "value"]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert c["log_marginal_likelihood"] == metrics["marglik"]["log_marglik"]
        per_datum = metrics["marglik"]["log_marglik_per_datum"]
        assert c["log_marginal_likelihood_per_datum"] == per_datum
        assert per_datum == pytest.approx(c["log_marginal_likelihood"] / c["n_data"], rel=1e-12)
        assert c["n_data"] == 16 and c["train_seconds"] > 0
        assert c["test"] == metrics["test"]
        for split in ("validation", "test"):
            assert c[split]["n_predictions"] == 8
            assert 0.0 <= c[split]["accuracy"] <= 1.0
    evidences = [c["log_marginal_likelihood_per_datum"] for c in cands]
    assert evidences[0] != evidences[1]
    assert sel["chosen"] == evidences.index(max(evidences))
    chosen = out / "candidates" / str(sel["chosen"])
    for name in ("adapter_model.safetensors", "adapter_config.json",
                 "laplace_posterior.safetensors", "laplace_config.json",
                 "marglik_hyperparameters.json", "metrics.json"):  # fmt: skip
        assert (out / name).read_bytes() == (chosen / name).read_bytes(), name
    assert not (out / "candidate.json").exists()


def test_select_from_yaml_and_flags(tmp_path):
    """select: in the config file, a flag for the same key replacing the file's values; the
    grid's order (first key slowest); list values as YAML lists or '+'-joined."""
    from hf_marglik.recipe import parse_args
    from hf_marglik.recipe.selection import candidate_configs

    config = tmp_path / "c.yaml"
    config.write_text(
        "select:\n  lora_target_modules: [[query], query+value]\n  lora_r: [4, 8]\n"
        "  prior_structure: [scalar]\n"
    )
    argv = ["--config", str(config), "--marglik", "--output_dir", str(tmp_path / "o"),
            "--select", "lora_r=2,16"]  # fmt: skip
    cfg = parse_args(argv)
    got = [(s, c.training.output_dir) for s, c in candidate_configs(cfg)]
    assert [s for s, _ in got] == [
        {"lora_target_modules": t, "lora_r": r, "prior_structure": "scalar"}
        for t in (["query"], ["query", "value"])
        for r in (2, 16)
    ]
    assert [Path(o) for _, o in got] == [tmp_path / "o" / "candidates" / str(i) for i in range(4)]
    c = candidate_configs(cfg)[3][1]
    assert (c.lora.lora_r, c.lora.lora_target_modules) == (16, ["query", "value"])
    assert c.training.prior_structure.value == "scalar"


BAD = {
    "unknown_key": (["--marglik", "--select", "lora_rank=4,8"], ["unknown key 'lora_rank'", "'lora_r'"]),
    "empty_list": (["--marglik", "--select", "lora_r="], ["empty"]),
    "fixed_key": (["--marglik", "--select", "output_dir=a,b"], ["'output_dir' cannot vary"]),
    "data_key": (["--marglik", "--select", "max_train_samples=8,16"], ["not be comparable"]),
    "repeated_value": (["--marglik", "--select", "lora_r=4,4"], ["listed twice"]),
    "key_twice": (["--marglik", "--select", "lora_r=4", "--select", "lora_r=8"], ["given twice"]),
    "bad_value": (["--marglik", "--select", "lora_r=4,four"], ["candidate 1", "lora_r"]),
    "no_marglik": (["--select", "lora_r=4,8"], ["add --marglik"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_select_bad_input_exits_2_before_training(case, tmp_path, capsys):
    args, expected = BAD[case]
    out = tmp_path / "out"
    rc = _script().main([*args, "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    for text in expected:
        assert text in err, err
    if case in ("unknown_key", "fixed_key", "data_key"):
        assert "Keys that can vary: " in err and "lora_target_modules" in err
        assert "output_dir" not in err.split("Keys that can vary: ")[1]
    assert "Traceback" not in err
    assert not out.exists()  # nothing trained, nothing written
