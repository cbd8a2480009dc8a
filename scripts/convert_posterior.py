"""Convert a run's pickle-based ``laplace_posterior.pt`` into the safetensors form.

    python scripts/convert_posterior.py [the train.py flags of the run] --output_dir RUN_DIR

Give the flags the run was trained with (``--config``, ``--marglik``, ``--tiny_random_model``,
the LoRA settings ...; ``--output_dir`` its folder): the model is rebuilt as in training
(``hf_marglik.recipe.run.load_trained``, no training data read), the old file loaded over it
and written beside it as ``laplace_posterior.safetensors`` + ``laplace_config.json``
(``Laplace.save_pretrained``), which ``Laplace.from_pretrained(RUN_DIR, model)`` loads. The old
file is left in place; the two forms are checked to give the same log marginal likelihood.
For a posterior of your own model: ``Laplace.load(OLD_PT, model).save_pretrained(FOLDER)``.
"""

from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ["HF_HUB_OFFLINE"])
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(args: list[str] | None = None) -> int:
    """Convert the posterior of the run that ``args`` (train.py's flags) describe; return the
    exit status: 0 on success, 2 for a bad input (the message is printed)."""
    from pathlib import Path

    from hf_marglik import Laplace
    from hf_marglik.pretrained import CONFIG_NAME, LEGACY_NAME
    from hf_marglik.recipe import RecipeError, parse_args
    from hf_marglik.recipe.run import load_trained, prepare

    try:
        cfg = parse_args(args)
        out = Path(cfg.training.output_dir)
        if not (out / LEGACY_NAME).is_file():
            raise RecipeError(f"{out / LEGACY_NAME} not found: nothing to convert.")
        if (out / CONFIG_NAME).is_file():
            raise RecipeError(f"{out / CONFIG_NAME} exists: the run is converted already.")
        with warnings.catch_warnings():  # the deprecation notice is what this script answers
            warnings.simplefilter("ignore", FutureWarning)
            model, old = load_trained(cfg, prepare(cfg), out)
        old.save_pretrained(out)
        new = Laplace.from_pretrained(out, model)
    except RecipeError as e:
        print(f"convert_posterior.py: error: {e}", file=sys.stderr)
        return 2
    if not bool(new.log_marginal_likelihood() == old.log_marginal_likelihood()):
        print("convert_posterior.py: error: the converted posterior differs", file=sys.stderr)
        return 1
    print(f"Wrote {out / CONFIG_NAME} and the tensors beside {out / LEGACY_NAME}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
