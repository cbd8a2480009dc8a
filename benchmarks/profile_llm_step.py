"""Where an optimizer step of the SmolLM2 answer-token run goes, plain vs ``--marglik``
(cProfile; BENCHMARKS.md "Where the LLM per-step overhead goes").

    OMP_NUM_THREADS=1 python benchmarks/profile_llm_step.py plain|marglik

Runs ``scripts/train.py``'s recipe at the study's ``llm_small`` size (seed 0, 96 / 40 / 60
articles × 64 tokens, ``--predictive_prior marglik``) under cProfile and prints the cumulative
seconds of the training step's parts: ``Trainer.training_step``, the loss (forward),
``OnlineCurvature.add`` (the extra backward of sampled labels and the factor accumulation), the
backward passes, the updates. cProfile adds overhead to Python-heavy code: read the shares.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FLAGS = (
    "--config configs/smollm2_answer_token.yaml --max_train_samples 96 --max_eval_samples 40 "
    "--max_test_samples 60 --max_seq_length 64 --eval_strategy no --seed 0 --disable_tqdm true "
    "--predictive_prior marglik"
).split()
PARTS = {
    "training_step", "compute_loss", "add", "backward", "_marglik_update", "call_model",
    "add_inputs", "prior_term", "step",
}  # fmt: skip


def main() -> int:
    from hf_marglik.recipe import parse_args, run

    mode = sys.argv[1] if len(sys.argv) > 1 else "marglik"
    flags = [*FLAGS, *(["--marglik"] if mode == "marglik" else [])]
    cfg = parse_args([*flags, "--output_dir", f"/tmp/profile_llm_{mode}"])
    prof = cProfile.Profile()
    prof.enable()
    run(cfg)
    prof.disable()
    stats = pstats.Stats(prof).stats
    for (path, line, func), (_, calls, tottime, cumtime, _) in sorted(
        stats.items(), key=lambda kv: -kv[1][3]
    ):
        wanted = "hf_marglik" in path or "transformers/trainer.py" in path or "autograd" in path
        if func in PARTS and wanted:
            where = path.split("site-packages/")[-1]
            print(
                f"{cumtime:8.2f} s cumulative {tottime:7.2f} s own {calls:6d} calls {where}:{line} {func}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
