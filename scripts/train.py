"""Fine-tune a pretrained model with LoRA, by weight decay or by marginal likelihood.

    python scripts/train.py [--config configs/NAME.yaml] [--marglik] [--key value ...]
    python scripts/train.py --marglik --select lora_r=4,8 [--select KEY=V1,V2 ...]

Without a config: all-MiniLM-L6-v2 + LoRA (r=8, query/value) + a 5-way head on a fixed split of
BBC News (320 train / 80 validation / 200 test articles, 128 tokens), all offline. See
docs/README_train.md and ``--help``.
"""

from __future__ import annotations

import os
import sys

# Nothing is downloaded unless the user asks for it (HF_HUB_OFFLINE=0 for hub models).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ["HF_HUB_OFFLINE"])
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_parser():
    """The argument parser (every config field is a flag); imported lazily for a fast --help."""
    from hf_marglik.recipe import make_parser as _make_parser

    return _make_parser()


def main(args: list[str] | None = None) -> int:
    """Run training with command-line ``args`` (default ``sys.argv[1:]``); return the exit status:
    0 on success, 2 for a bad input (the message is printed, no traceback), 143 after SIGTERM
    (a checkpoint was written; resume with ``--resume_from_checkpoint true``)."""
    from hf_marglik.preemption import SIGTERM_EXIT_CODE
    from hf_marglik.recipe import RecipeError, parse_args, run, select
    from hf_marglik.recipe.errors import TrainingInterrupted

    try:
        cfg = parse_args(args)
        select(cfg) if cfg.select else run(cfg)
    except RecipeError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # SIGTERM: a checkpoint was written
        print(f"train.py: {e}", file=sys.stderr)
        return SIGTERM_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
