"""Wall seconds per optimizer step of the SmolLM2 answer-token config, plain ``Trainer`` against
``MargLikTrainer``'s defaults, in one process, repeats interleaved (BENCHMARKS.md, "Per-step
cost on SmolLM2"):

    python benchmarks/llm_step_times.py [--repeats 3] [--threads 2] [--budget 0.25]
    python benchmarks/llm_step_times.py --flags "--config configs/smollm2_sft.yaml
        --max_train_samples 64 --max_seq_length 128 --eval_strategy no --disable_tqdm true"

The study's ``llm_small`` size (seed 0, 96 training articles × 64 tokens, batch 8, 2 epochs =
24 optimizer steps, real SmolLM2-135M-Instruct weights). A callback placed first times each
step from ``on_step_begin`` to ``on_step_end``: forward, backward and optimizer step, without the
marginal-likelihood updates (timed by the trainer itself: ``marglik_fit_seconds``,
``marglik_hyper_seconds``). Steps of the ``--marglik`` run are split into sampled steps (the
online curvature's extra backward of sampled labels) and the others. Prints the medians over
repeats of the mean step time and the ratio marglik / plain of each repeat.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FLAGS = (
    "--config configs/smollm2_answer_token.yaml --max_train_samples 96 --max_eval_samples 40 "
    "--max_test_samples 60 --max_seq_length 64 --eval_strategy no --seed 0 --disable_tqdm true "
    "--predictive_prior marglik --logging_steps 1000"
).split()


def timed_run(mode: str, base: list[str], extra: list[str], prep_cache: dict) -> dict:
    from transformers import TrainerCallback, set_seed

    from hf_marglik.recipe import parse_args
    from hf_marglik.recipe.models import build_model
    from hf_marglik.recipe.run import _trainer, prepare

    out = tempfile.mkdtemp(prefix=f"llm_steps_{mode}_")
    flags = [*base, *extra, *(["--marglik"] if mode == "marglik" else []), "--output_dir", out]
    cfg = parse_args(flags)
    if "prep" not in prep_cache:
        prep_cache["prep"] = prepare(cfg)
    prep = prep_cache["prep"]
    set_seed(cfg.training.seed)
    model = build_model(cfg.model, cfg.lora, prep.source, prep.num_labels, prep.class_ids)
    trainer = _trainer(cfg, model, prep.encoded, prep.collator, prep.source.tokenizer)
    steps: list[tuple[float, bool]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            online = getattr(trainer, "_online", None)
            self.sampled = bool(online is not None and trainer._collecting())
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            steps.append((time.perf_counter() - self.t0, self.sampled))

    trainer.callback_handler.callbacks.insert(0, StepTimer())  # before the update's callback
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    logs = trainer.state.log_history
    fits = [h["marglik_fit_seconds"] for h in logs if "marglik_fit_seconds" in h]
    updates = sum(fits) + sum(h.get("marglik_hyper_seconds", 0.0) for h in logs)
    return {
        "step": statistics.mean(s for s, _ in steps),
        "sampled": [s for s, k in steps if k],
        "other": [s for s, k in steps if not k],
        "updates": updates,
        "fits": fits,
        "epoch": sum(t for t, _ in steps) / max(cfg.training.num_train_epochs, 1),
        "train_wall": wall,
        "n_steps": len(steps),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=None, help="marglik_budget (default: ours)")
    p.add_argument("--flags", default=None, help="train.py flags instead of the answer-token run's")
    p.add_argument("--marglik_flags", default=None, help="more flags for the --marglik run")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    extra = [] if args.budget is None else ["--marglik_budget", str(args.budget)]
    extra += [] if args.marglik_flags is None else args.marglik_flags.split()
    base = FLAGS if args.flags is None else args.flags.split()
    cache: dict = {}
    ratios, plain_s, marglik_s = [], [], []
    for r in range(args.repeats):
        a = timed_run("plain", base, [], cache)
        b = timed_run("marglik", base, extra, cache)
        ratios.append(b["step"] / a["step"])
        plain_s.append(a["step"])
        marglik_s.append(b["step"])

        def mean(xs):
            return statistics.mean(xs) if xs else float("nan")

        print(
            f"repeat {r}: plain {a['step']:.3f} s/step, marglik {b['step']:.3f} s/step "
            f"(sampled {mean(b['sampled']):.3f} x{len(b['sampled'])}, other "
            f"{mean(b['other']):.3f} x{len(b['other'])}), ratio {ratios[-1]:.3f}; updates "
            f"{b['updates']:.1f} s; train wall plain {a['train_wall']:.1f} s, marglik "
            f"{b['train_wall']:.1f} s; fits [{', '.join(f'{x:.1f}' for x in b['fits'])}] s "
            f"against an epoch's steps {b['epoch']:.1f} s (plain {a['epoch']:.1f} s); sampled steps "
            f"[{', '.join(f'{x:.2f}' for x in b['sampled'])}]",
            flush=True,
        )
    med = statistics.median
    print(
        f"median over {args.repeats} repeats ({args.threads} threads): plain {med(plain_s):.3f} "
        f"s/step, marglik {med(marglik_s):.3f} s/step, ratio {med(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
