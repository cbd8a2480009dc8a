"""The training recipe behind ``scripts/train.py``: LoRA fine-tuning of a pretrained model on a
text dataset, by plain ``transformers.Trainer`` or by :class:`~hf_marglik.trainer.MargLikTrainer`.

Modules, one job each: ``arguments`` (config dataclasses), ``config`` (YAML + command line),
``data`` (load and split texts), ``encode`` (tokenise, pad), ``models`` (load, LoRA),
``answer_token`` (answer-token classification with a causal LM), ``metrics`` (accuracy, NLL,
ECE, Brier), ``plotting``, ``report`` (outputs, summary), ``resume`` (resume, SIGTERM), ``run``
(the run itself), ``grid`` and ``selection`` (``--select``: candidates, model selection by the
evidence).
"""

from .arguments import DataArguments, LoraArguments, ModelArguments
from .config import RunConfig, make_parser, parse_args
from .errors import RecipeError
from .run import run
from .selection import select

__all__ = [
    "DataArguments",
    "LoraArguments",
    "ModelArguments",
    "RecipeError",
    "RunConfig",
    "make_parser",
    "parse_args",
    "run",
    "select",
]
