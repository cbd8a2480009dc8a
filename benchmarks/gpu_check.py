"""One-GPU check of hf_marglik, prepared to run in a few minutes on one CUDA GPU:

    python benchmarks/gpu_check.py [--out gpu_check.json]       # needs CUDA; fails fast without
    python benchmarks/gpu_check.py --dry-run                     # = --device cpu --tiny

No test of the suite takes a device (they all run on the CPU), so the script runs its own
device checks first, each against the CPU or an exact reference:

1. ``laplace_device_vs_cpu``: exact-GGN K-FAC Laplace of a tiny LoRA Llama in float64, fit on the
   device and on the CPU: Kronecker factors, log marginal likelihood at three priors and the GLM
   probit predictive agree to 1e-8 relative; the Monte-Carlo predictive and the ``nn``
   predictive draw with a generator on the device; the posterior saved on the device loads
   (``map_location="cpu"``) back onto the device model with the same marginal likelihood and
   predictive.
2. ``bf16_autocast_step``: ``MargLikTrainer`` steps with ``bf16=True`` (autocast, float32
   weights) and a fit after each epoch: the curvature is float32 and finite, and its log
   marginal likelihood is within 2% of a float32 fit at the same weights.
3. ``metrics_on_device``: the recipe's streaming test metrics take device logits.
4. ``qlora_4bit`` (with bitsandbytes): a tiny 4-bit Llama on the device has the curvature and
   predictive of its dequantised float twin (1e-3 relative: the device's 4-bit kernels round in
   their own order).

Then the SmolLM2 answer-token config (``configs/smollm2_answer_token.yaml``) at a small size in
bf16: plain ``Trainer``, ``--marglik`` (the defaults: online curvature) and ``--marglik`` on a
4-bit base (``--load_in_4bit true --bnb_4bit_compute_dtype bfloat16``): mean step time, the
ratio marglik / plain, peak GPU memory (``torch.cuda.max_memory_allocated``) of training, of a
training step and of one curvature fit (two batches, the same settings), test accuracy and NLL
of the MAP. A compact report is printed and everything is written to ``--out`` (JSON).

``--dry-run`` runs every path on the CPU at tiny sizes (a tiny random model behind the SmolLM2
tokenizer, 8 training articles; memory figures are None): tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests"):  # the package and tests/models.py (the shared builders)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

NO_CUDA = (
    "gpu_check.py: error: no CUDA device (torch.cuda.is_available() is False). Run it on a "
    "machine with one CUDA GPU, or run the same code paths on the CPU at tiny sizes with "
    "--dry-run."
)
RUN_FLAGS = (
    "--config configs/smollm2_answer_token.yaml --max_train_samples 64 --max_eval_samples 16 "
    "--max_test_samples 64 --max_seq_length 128 --num_train_epochs 2 --eval_strategy no "
    "--seed 0 --disable_tqdm true --predictive_prior marglik --logging_steps 1000 --bf16 true "
    "--per_device_train_batch_size 8"
).split()
TINY_RUN_FLAGS = [
    "--tiny_random_model", "true", "--max_train_samples", "8", "--max_test_samples", "4",
    "--max_eval_samples", "4", "--max_seq_length", "32", "--num_train_epochs", "1",
    "--per_device_train_batch_size", "4",
]  # fmt: skip
VARIANTS = {
    "plain": [],
    "marglik": ["--marglik"],
    "marglik_4bit": ["--marglik", "--load_in_4bit", "true", "--bnb_4bit_compute_dtype", "bfloat16"],
}


# ------------------------------------------------------------------------------ helpers
def _rel(a, b) -> float:
    """max |a - b| / max |b| (0 for equal tensors)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


class Memory:
    """Peak device memory (CUDA); None on the CPU."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20

    def now_mib(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        return torch.cuda.memory_allocated() / 2**20


def _check(name: str, fn, *args) -> dict:
    t0 = time.perf_counter()
    try:
        result = {"name": name, **fn(*args)}
    except Exception as e:  # a failed check is reported, the others still run
        result = {"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _llama_batches(vocab: int, n_batches: int = 2, labels: str = "lm"):
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (4, 6), generator=g)
        mask = torch.ones(4, 6, dtype=torch.long)
        mask[0, -2:] = 0
        y = ids.clone() if labels == "lm" else torch.randint(0, 3, (4,), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": y})
    return out


# ------------------------------------------------------------------------------ checks
def check_laplace_device_vs_cpu(device: str) -> dict:
    """See the module docstring, 1."""
    import torch
    from models import llama_lora_model, randomise_trainable

    from hf_marglik import Laplace
    from hf_marglik.recipe.answer_token import AnswerTokenClassifier

    lm = randomise_trainable(llama_lora_model(hidden=16, layers=2, vocab=16), 0, scale=0.3)
    cpu_model = AnswerTokenClassifier(lm, [3, 5, 7])
    dev_model = copy.deepcopy(cpu_model).to(device)
    batches = _llama_batches(16, labels="cls")
    laps = {}
    for where, model in (("cpu", cpu_model), ("device", dev_model)):
        laps[where] = Laplace(model, "classification", backend="ggn", prior_precision=1.0).fit(
            batches
        )
    lc, ld = laps["cpu"], laps["device"]
    errs = {"kron_factors": 0.0, "log_marglik": 0.0}
    for (bc, ac), (bd, ad) in zip(lc.kron_factors(), ld.kron_factors()):
        errs["kron_factors"] = max(errs["kron_factors"], _rel(bd, bc), _rel(ad, ac))
    for prec in (0.1, 1.0, 10.0):
        t = torch.tensor([prec], dtype=torch.float64)
        mc, md = lc.log_marginal_likelihood(t), ld.log_marginal_likelihood(t.to(device))
        errs["log_marglik"] = max(errs["log_marglik"], abs(float(md) - float(mc)) / abs(float(mc)))
    x = batches[0]
    errs["glm_probit"] = _rel(ld(x), lc(x))
    g = torch.Generator(ld.device).manual_seed(0)
    mc_probs = ld(x, link_approx="mc", n_samples=20, generator=g)
    nn_probs = ld(x, pred_type="nn", n_samples=3, generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        ld.save(Path(tmp) / "posterior.pt")
        loaded = Laplace.load(Path(tmp) / "posterior.pt", dev_model)
    errs["loaded_log_marglik"] = _rel(
        loaded.log_marginal_likelihood(), ld.log_marginal_likelihood()
    )
    errs["loaded_glm_probit"] = _rel(loaded(x), ld(x))
    finite = bool(torch.isfinite(mc_probs).all() and torch.isfinite(nn_probs).all())
    ok = finite and all(v < 1e-8 for v in errs.values())
    return {"ok": ok, "max_rel_error": errs, "sampled_predictives_finite": finite, "tol": 1e-8}


def check_bf16_autocast_step(device: str) -> dict:
    """See the module docstring, 2."""
    import torch
    from models import DictDataset, llama_lora_model, tiny_trainer_args

    from hf_marglik import Laplace, MargLikTrainer

    model = llama_lora_model(hidden=32, layers=2, vocab=32, dtype=torch.float32).to(device)
    g = torch.Generator().manual_seed(2)
    items = []
    for _ in range(16):
        ids = torch.randint(0, 32, (8,), generator=g)
        items.append({"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long),
                      "labels": ids.clone()})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        args = tiny_trainer_args(
            tmp, likelihood="causal_lm", backend="ggn-mc", num_train_epochs=2,
            n_epochs_burnin=0, bf16=True, use_cpu=device == "cpu", remove_unused_columns=False,
        )  # fmt: skip
        trainer = MargLikTrainer(model=model, args=args, train_dataset=DictDataset(items))
        trainer.train()
    lap = trainer.laplace
    factors = lap.kron_factors()
    dtypes = sorted({str(t.dtype) for b, a in factors for t in (b, a) if t is not None})
    finite = all(torch.isfinite(t).all() for b, a in factors for t in (b, a) if t is not None)
    loader = [{k: v.to(device) for k, v in b.items()} for b in _collate(items, 8)]
    # accelerate patched model.forward to run under bf16 autocast; the float32 reference needs it
    # without (keep_fp32_wrapper=False restores the original forward)
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    fits = {}
    for name, autocast in (("bf16", True), ("float32", False)):
        ref = Laplace(model, "causal_lm", backend="ggn-mc", seed=0, prior_precision=1.0)
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=autocast):
            ref.fit(loader)
        fits[name] = float(ref.log_marginal_likelihood())
    rel = abs(fits["bf16"] - fits["float32"]) / abs(fits["float32"])
    margliks = [float(m) for m in trainer.margliks]
    ok = dtypes == ["torch.float32"] and finite and rel < 0.02 and all(map(math.isfinite, margliks))
    return {
        "ok": ok,
        "curvature_dtypes": dtypes,
        "finite": finite,
        "neg_log_marglik": margliks,
        "log_marglik_bf16_vs_float32_rel": rel,
        "tol": 0.02,
    }


def _collate(items: list[dict], batch: int) -> list[dict]:
    import torch

    return [
        {k: torch.stack([it[k] for it in items[i : i + batch]]) for k in items[0]}
        for i in range(0, len(items), batch)
    ]


def check_metrics_on_device(device: str) -> dict:
    """See the module docstring, 3."""
    import torch

    from hf_marglik.recipe.metrics import CalibrationMeter

    g = torch.Generator().manual_seed(3)
    logits, y = torch.randn(32, 5, generator=g), torch.randint(0, 5, (32,), generator=g)
    ref, dev = CalibrationMeter(), CalibrationMeter()
    ref.update(logits, y)
    dev.update(logits.to(device), y.to(device))
    a, b = ref.compute(), dev.compute()
    err = max(abs(a[k] - b[k]) for k in ("accuracy", "nll", "ece", "brier"))
    return {"ok": err < 1e-9, "max_abs_error": err, "tol": 1e-9}


def check_qlora_4bit(device: str) -> dict:
    """See the module docstring, 4."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"ok": None, "skipped": "bitsandbytes is not installed (pip install .[qlora])"}
    from models import dequantised_twin, kbit_llama_lora, tiny_llama_folder

    from hf_marglik import Laplace
    from hf_marglik.recipe.answer_token import AnswerTokenClassifier

    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_llama_folder(Path(tmp), vocab=32)
        q = kbit_llama_lora(folder, device=device)
        ref = dequantised_twin(folder, q)
    batches = [{k: v.to(device) for k, v in b.items()} for b in _llama_batches(32, labels="cls")]
    laps = [
        Laplace(AnswerTokenClassifier(m, [3, 5, 7]), "classification", backend="ggn").fit(batches)
        for m in (q, ref)
    ]
    errs = {"kron_factors": 0.0}
    for (bq, aq), (br, ar) in zip(laps[0].kron_factors(), laps[1].kron_factors()):
        errs["kron_factors"] = max(errs["kron_factors"], _rel(bq, br), _rel(aq, ar))
    mq, mr = (float(lap.log_marginal_likelihood()) for lap in laps)
    errs["log_marglik"] = abs(mq - mr) / abs(mr)
    errs["glm_probit"] = _rel(laps[0](batches[0]), laps[1](batches[0]))
    return {"ok": all(v < 1e-3 for v in errs.values()), "max_rel_error": errs, "tol": 1e-3}


# ------------------------------------------------------------------------------ SmolLM2 runs
def smollm2_run(mode: str, flags: list[str], device: str, prep_cache: dict) -> dict:
    """One variant: per-step wall time and peak memory, a curvature fit's peak memory (two
    training batches, autocast as in training), test accuracy and NLL of the MAP."""
    import torch
    from transformers import TrainerCallback, set_seed

    from hf_marglik import Laplace
    from hf_marglik.recipe import parse_args
    from hf_marglik.recipe.metrics import evaluate
    from hf_marglik.recipe.models import build_model
    from hf_marglik.recipe.run import _placement, _trainer, prepare

    out = tempfile.mkdtemp(prefix=f"gpu_check_{mode}_")
    cfg = parse_args([*flags, *VARIANTS[mode], "--output_dir", out])
    if "prep" not in prep_cache:
        prep_cache["prep"] = prepare(cfg)
    prep = prep_cache["prep"]
    mem = Memory(device)
    mem.reset()
    set_seed(cfg.training.seed)
    model = build_model(
        cfg.model, cfg.lora, prep.source, prep.num_labels, prep.class_ids, **_placement(cfg)
    )
    trainer = _trainer(cfg, model, prep.encoded, prep.collator, prep.source.tokenizer)
    steps: list[tuple[float, float | None]] = []

    class StepMeter(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            mem.reset()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if mem.cuda:
                torch.cuda.synchronize()
            steps.append((time.perf_counter() - self.t0, mem.peak_mib()))

    trainer.callback_handler.callbacks.insert(0, StepMeter())  # before the update's callback
    t0 = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - t0
    result = {
        "mode": mode,
        "n_steps": len(steps),
        "step_s_mean": statistics.mean(s for s, _ in steps),
        "step_s_median": statistics.median(s for s, _ in steps),
        "train_wall_s": train_wall,
        "step_peak_mib": max((m for _, m in steps if m is not None), default=None),
        "resident_mib": mem.now_mib(),
    }
    if cfg.marglik:
        a = cfg.training
        lap = Laplace(model, a.likelihood, backend=a.backend, kfac_approx=a.kfac_approx, seed=0)
        loader = list(itertools.islice(trainer.get_train_dataloader(), 2))
        mem.reset()
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=a.bf16):
            lap.fit(loader)
        result["fit_2_batches_peak_mib"] = mem.peak_mib()
        logs = trainer.state.log_history
        result["marglik_fit_s"] = [
            h["marglik_fit_seconds"] for h in logs if "marglik_fit_seconds" in h
        ]
        result["neg_log_marglik_last"] = float(trainer.margliks[-1]) if trainer.margliks else None
    test = evaluate(model, trainer.get_test_dataloader(prep.encoded["test"]), cfg.model.task)
    result.update(
        test_accuracy=test["accuracy"], test_nll=test["nll"], n_test=test["n_predictions"]
    )
    del trainer, model
    if mem.cuda:
        torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------ report
def report(data: dict) -> str:
    lines = [f"gpu_check on {data['device_name']} (torch {data['torch']}, CUDA {data['cuda']})"]
    for c in data["checks"]:
        status = {True: "ok", False: "FAIL", None: "skipped"}[c.get("ok")]
        detail = c.get("error") or c.get("skipped") or ""
        if not detail:
            shown = c.get("max_rel_error") or {
                k: c[k] for k in ("log_marglik_bf16_vs_float32_rel", "max_abs_error") if k in c
            }
            detail = ", ".join(f"{k} {v:.1e}" for k, v in shown.items())
        lines.append(f"  {c['name']:<24} {status:<7} {detail} ({c['seconds']:.1f} s)")
    runs = data.get("runs") or {}
    if runs:

        def mib(x):
            return "-" if x is None else f"{x:,.0f}"

        lines.append(
            "  SmolLM2 answer-token runs: s/step (median), ratio to plain, peak MiB of a step, of a "
            "2-batch fit, test acc / NLL"
        )
        plain = runs.get("plain", {}).get("step_s_median")
        for mode, r in runs.items():
            if "error" in r or "skipped" in r:
                problem = f"FAIL {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
                lines.append(f"  {mode:<14} {problem}")
                continue
            ratio = r["step_s_median"] / plain if plain else float("nan")
            lines.append(
                f"  {mode:<14} {r['step_s_median']:.3f} s  x{ratio:.2f}  step {mib(r['step_peak_mib'])}"
                f"  fit {mib(r.get('fit_2_batches_peak_mib'))}  acc {r['test_accuracy']:.3f}"
                f"  NLL {r['test_nll']:.3f}"
            )
    lines.append(f"  all checks ok: {data['ok']}; JSON: {data['out']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny SmolLM2 runs (a tiny random model)")
    p.add_argument("--dry-run", action="store_true", help="--device cpu --tiny")
    p.add_argument("--skip-runs", action="store_true", help="the device checks only")
    p.add_argument("--out", default="gpu_check.json", help="JSON file to write")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    cuda = torch.device(args.device).type == "cuda"
    data = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tiny": args.tiny,
        "out": args.out,
        "checks": [
            _check("laplace_device_vs_cpu", check_laplace_device_vs_cpu, args.device),
            _check("bf16_autocast_step", check_bf16_autocast_step, args.device),
            _check("metrics_on_device", check_metrics_on_device, args.device),
            _check("qlora_4bit", check_qlora_4bit, args.device),
        ],
        "runs": {},
    }
    if not args.skip_runs:
        flags = RUN_FLAGS + (TINY_RUN_FLAGS if args.tiny else [])
        flags += ["--use_cpu", "true"] if not cuda else []
        cache: dict = {}
        for mode in VARIANTS:
            if mode.endswith("4bit") and importlib.util.find_spec("bitsandbytes") is None:
                data["runs"][mode] = {"mode": mode, "skipped": "bitsandbytes is not installed"}
                continue
            try:
                data["runs"][mode] = smollm2_run(mode, flags, args.device, cache)
            except Exception as e:
                data["runs"][mode] = {"mode": mode, "error": f"{type(e).__name__}: {e}"}
    data["ok"] = all(c.get("ok") is not False for c in data["checks"]) and not any(
        "error" in r for r in data["runs"].values()
    )
    Path(args.out).write_text(json.dumps(data, indent=1, default=str))
    print(report(data))
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
