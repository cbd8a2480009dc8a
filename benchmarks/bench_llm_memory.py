"""Memory of a curvature fit against a training step, with gradient checkpointing, and the
start-up time of the bundled SmolLM2 with and without the weights cache (issue 16).

Memory. One Monte-Carlo K-FAC fit (``Laplace(model, "causal_lm", backend="ggn-mc").fit``,
one batch) against one training step (``model(**batch).loss.backward()`` in train mode) at the
same batch, each with and without gradient checkpointing (``gradient_checkpointing_enable``),
dense factors and ``factor_rank``. Two measures, each in a fresh process per cell:

* live tensor bytes: the peak of the bytes of all tensor storage created during the call and
  still alive (``tests/memtrack.py``: a dispatch mode that counts every operator's outputs until
  they are freed; independent of the allocator, the threads and other processes);
* RSS: the increase of the process's peak RSS (``VmHWM`` after ``clear_refs``) over its RSS
  before the call, on the first call in the process (the allocator keeps freed memory, so this
  is an upper bound that depends on glibc).

Models (random init, fixed seed, float32, LoRA on ``q_proj``/``v_proj``, no dropout):
``test`` is the model of ``tests/test_precision.py``'s memory test (8 layers of width 64,
vocabulary 16, batch 4 × 256, LoRA r=4); ``smollm2`` has SmolLM2-135M's shapes (30 layers of
width 576, 9 heads, 3 KV heads, MLP 1536, vocabulary 49,152) at the recipe's
batch (``configs/smollm2_causal_lm.yaml``: 4 × 128 tokens, LoRA r=8).

Start-up. ``load_source`` + ``build_model`` of ``configs/smollm2_causal_lm.yaml``'s model
(``bundled:SmolLM2-135M-Instruct``, float32, LoRA r=8 on q_proj/v_proj), each in a fresh process
(imports not counted): from the GGUF file (``HF_MARGLIK_CACHE=off``), building the cache (an
empty cache folder), and from the cache (twice). The last process also loads the model from the
GGUF file and checks that the cached weights are equal to the dequantised ones, the configs equal
and the tokenizers the same.

Usage::

    python benchmarks/bench_llm_memory.py              # print the tables
    python benchmarks/bench_llm_memory.py --write-md   # also (re)write its BENCHMARKS.md section
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchlib import (
    add_markdown_args,
    git_rev,
    load_average,
    model_builders,
    offline_environment,
    peak_rss_mb,
    replace_section,
    rss_reset,
    setup_process,
    status_mb,
)

SECTION = "## LLM memory and start-up (issue 16)"
SHAPES = {
    "test": dict(hidden=64, layers=8, heads=4, kv_heads=2, vocab=16, r=4, intermediate=128),
    "smollm2": dict(
        hidden=576, layers=30, heads=9, kv_heads=3, vocab=49152, r=8, intermediate=1536
    ),
}
BATCH = {"test": (4, 256), "smollm2": (4, 128)}
RANK = {"test": 4, "smollm2": 8}
HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------ one cell
def _model(shape: str):
    import torch

    models = model_builders()
    s = SHAPES[shape]
    b, t = BATCH[shape]
    model = models.llama_lora_model(
        hidden=s["hidden"],
        layers=s["layers"],
        heads=s["heads"],
        kv_heads=s["kv_heads"],
        vocab=s["vocab"],
        r=s["r"],
        intermediate=s["intermediate"],
        max_positions=t,
        dtype=torch.float32,
    )
    models.randomise_trainable(model, 0, 0.1)
    ids = torch.randint(0, s["vocab"], (b, t), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def one_memory(shape: str, op: str, checkpointing: bool, rank: int | None) -> dict:
    """Peak RSS increase (first call) and peak live tensor bytes (second call) of ``op``."""
    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    from memtrack import LiveBytes

    from hf_marglik import Laplace

    model, batch = _model(shape)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def call():
        if op == "step":
            model.train()
            model(**batch).loss.backward()
            for p in model.parameters():
                p.grad = None
        else:
            Laplace(model, "causal_lm", backend="ggn-mc", seed=0, factor_rank=rank).fit([batch])

    reset = rss_reset()
    before = status_mb("VmRSS")
    t0 = time.perf_counter()
    call()
    seconds = time.perf_counter() - t0
    rss = peak_rss_mb(reset) - before
    with LiveBytes() as m:
        call()
    return {"rss_mb": rss, "live_mb": m.peak / 2**20, "seconds": seconds}


def one_startup(mode: str, check: bool) -> dict:
    """Seconds of ``load_source`` + ``build_model`` (imports done before the clock starts)."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from hf_marglik.recipe import weights_cache
    from hf_marglik.recipe.arguments import LoraArguments, ModelArguments
    from hf_marglik.recipe.models import build_model, load_source

    args = ModelArguments(
        model_name_or_path="bundled:SmolLM2-135M-Instruct", task="causal_lm", model_dtype="float32"
    )
    lora = LoraArguments(lora_r=8, lora_alpha=16, lora_target_modules=["q_proj", "v_proj"])
    t0 = time.perf_counter()
    source = load_source(args)
    t1 = time.perf_counter()
    model = build_model(args, lora, source, None)
    t2 = time.perf_counter()
    out = {"mode": mode, "source_s": t1 - t0, "build_s": t2 - t1, "total_s": t2 - t0}
    out["cache_used"] = source.cache is not None
    if check:
        out.update(_check_against_gguf(model, source, weights_cache))
    return out


def _check_against_gguf(model, source, weights_cache) -> dict:
    """Compare the cached model, config and tokenizer with those read from the GGUF file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cache = weights_cache.cached_gguf(source.path, source.gguf_file)
    ref = AutoModelForCausalLM.from_pretrained(
        source.path, gguf_file=source.gguf_file, dtype=torch.float32
    )
    mine = AutoModelForCausalLM.from_pretrained(str(cache), dtype=torch.float32)
    a, b = ref.state_dict(), mine.state_dict()
    same_weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    skip = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}
    skip |= {"quantization_config"}  # the cache holds the dequantised model
    ca = {
        k: v
        for k, v in AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
        .to_dict()
        .items()
        if k not in skip
    }
    cb = {
        k: v for k, v in AutoConfig.from_pretrained(str(cache)).to_dict().items() if k not in skip
    }
    config_diff = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
    ta = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    tb = AutoTokenizer.from_pretrained(str(cache))
    text = "BBC News article:\nShares in Marks & Spencer rose 3% on Tuesday. <|im_end|> émigré 😀"
    same_tok = (
        ta.get_vocab() == tb.get_vocab()
        and ta(text)["input_ids"] == tb(text)["input_ids"]
        and ta.all_special_tokens == tb.all_special_tokens
        and ta.chat_template == tb.chat_template
        and ta.model_max_length == tb.model_max_length
    )
    return {"same_weights": same_weights, "config_diff": config_diff, "same_tokenizer": same_tok}


# ------------------------------------------------------------------------------ driver
def _run(args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, str(HERE), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"{args} failed ({out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(shapes: list[str]) -> tuple[str, list[dict]]:
    rows = []
    for shape in shapes:
        for ckpt in (False, True):
            step = _run(["--one-memory", shape, "step", str(int(ckpt)), "none"])
            for rank in (None, RANK[shape]):
                fit = _run(["--one-memory", shape, "fit", str(int(ckpt)), str(rank).lower()])
                rows.append({"shape": shape, "ckpt": ckpt, "rank": rank, "fit": fit, "step": step})
                print(rows[-1], flush=True)
    return render_memory(rows), rows


def render_memory(rows: list[dict]) -> str:
    lines = [
        "| model | checkpointing | factor_rank | fit: live MiB | step: live MiB | fit / step "
        "| fit: ΔRSS MB | step: ΔRSS MB | fit s | step s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, s = r["fit"], r["step"]
        lines.append(
            f"| {r['shape']} | {'on' if r['ckpt'] else 'off'} | {r['rank'] or 'dense'} "
            f"| {f['live_mb']:.1f} | {s['live_mb']:.1f} | **{f['live_mb'] / s['live_mb']:.2f}** "
            f"| {f['rss_mb']:.0f} | {s['rss_mb']:.0f} | {f['seconds']:.1f} | {s['seconds']:.1f} |"
        )
    return "\n".join(lines)


def startup_table() -> tuple[str, list[dict]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="hf_marglik_cache_") as cache:
        env = {"HF_MARGLIK_CACHE": cache}
        rows.append(_run(["--one-startup", "gguf (cache off)", "0"], {"HF_MARGLIK_CACHE": "off"}))
        rows.append(_run(["--one-startup", "first start: cache built", "0"], env))
        rows.append(_run(["--one-startup", "cached", "0"], env))
        rows.append(_run(["--one-startup", "cached (again)", "1"], env))
        size = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file()) / 1e6
    for r in rows:
        print(r, flush=True)
    return render_startup(rows, size), rows


def render_startup(rows: list[dict], size: float) -> str:
    lines = [
        "| start | load_source s | build_model s | total s | cache read |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['source_s']:.1f} | {r['build_s']:.1f} | **{r['total_s']:.1f}** "
            f"| {'yes' if r['cache_used'] else 'no'} |"
        )
    check = rows[-1]
    lines.append("")
    lines.append(
        f"Cache folder: {size:.0f} MB. Check against the GGUF file: weights equal "
        f"{check['same_weights']}, config keys that differ {check['config_diff'] or 'none'}, "
        f"tokenizer the same {check['same_tokenizer']}."
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", nargs="+", default=["test", "smollm2"], choices=list(SHAPES))
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-startup", action="store_true")
    p.add_argument("--one-memory", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--one-startup", nargs=2, help=argparse.SUPPRESS)
    add_markdown_args(p, SECTION)
    a = p.parse_args(argv)
    offline_environment()
    setup_process(a.threads)
    if a.one_memory:
        shape, op, ckpt, rank = a.one_memory
        r = None if rank == "none" else int(rank)
        print(json.dumps(one_memory(shape, op, ckpt == "1", r)))
        return
    if a.one_startup:
        print(json.dumps(one_startup(a.one_startup[0], a.one_startup[1] == "1")))
        return
    load_before, t0 = load_average(), time.time()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        SECTION,
        "",
        f"Written by `python benchmarks/bench_llm_memory.py --write-md` on {when}, git "
        f"{git_rev()} (+ uncommitted changes), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {a.threads} torch threads, load average {load_before} "
        "(shared machine).",
        "",
    ]
    if not a.no_memory:
        table, _ = memory_table(a.shapes)
        parts += ["### Peak memory: one fit against one training step, same batch", "", table, ""]
    if not a.no_startup:
        table, _ = startup_table()
        parts += ["### Start-up of the bundled SmolLM2", "", table, ""]
    parts.append(f"Load average after: {load_average()}; {(time.time() - t0) / 60:.1f} min.")
    text = "\n".join(parts) + "\n"
    print(text)
    if a.write_md:
        replace_section(a.md, SECTION, text)


if __name__ == "__main__":
    main()
