"""Command line and YAML configuration of ``scripts/train.py``.

Precedence, lowest first: the dataclass defaults, :data:`RECIPE_DEFAULTS` (the embedded default
run, identical to ``configs/default.yaml``), the YAML file given by ``--config``, command-line
flags. Every YAML key must name a flag; an unknown key is a :class:`RecipeError` that names the
nearest valid key. Every YAML value must have the flag's type (:func:`check_yaml_types`), and a
flag value that does not convert is a :class:`RecipeError` too, not argparse's usage dump.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .arguments import DataArguments, LoraArguments, ModelArguments
from .errors import RecipeError, nearest
from .grid import parse_selection

# The embedded default run: MiniLM + LoRA r=8 (query, value) + 5-way head on the BBC News split.
# Values that differ from the dataclass defaults of TrainingArguments / MargLikTrainingArguments.
RECIPE_DEFAULTS: dict[str, Any] = {
    "learning_rate": 3e-3,
    "num_train_epochs": 5,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "weight_decay": 0.01,
    "lr_scheduler_type": "constant",
    "logging_steps": 5,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "remove_unused_columns": False,
    "label_names": ["labels"],
    "dataloader_num_workers": 0,
    # marginal likelihood (used with --marglik only)
    "likelihood": "classification",
    "hessian_structure": "kron",
    "backend": "ggn-mc",
    "prior_structure": "layerwise",
    "prior_prec_init": 1.0,
    "lr_hyp": 0.1,
    "n_epochs_burnin": 1,
    "marglik_frequency": 1,
    "n_hypersteps": 50,
    "eval_laplace": False,
    "predictive_prior": "gridsearch",
}

_CLI_ONLY = {"help", "config"}


@dataclass
class RunConfig:
    """Everything a run needs, parsed."""

    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    training: Any  # MargLikTrainingArguments (--marglik) or TrainingArguments
    marglik: bool
    config_file: str | None
    select: dict[str, list[tuple[str, ...]]] | None = None
    """``--select``: each key's candidate values as command-line tokens (:mod:`.grid`)."""
    argv: list[str] | None = None
    """The command line this configuration was parsed from."""


def _str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def make_parser(task: str | None = None):
    """The ``HfArgumentParser`` over (ModelArguments, DataArguments, LoraArguments, the
    training arguments of ``task``), plus ``--config`` and ``--marglik``. The training
    arguments are ``MargLikTrainingArguments``, or ``MargLikSFTConfig`` (TRL's ``SFTConfig``
    and the marginal-likelihood settings) for ``task='sft'``."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        (ModelArguments, DataArguments, LoraArguments, _training_class(task)),
        exit_on_error=False,  # a bad flag value is a RecipeError (one line), not a usage dump
        prog="train.py",
        description=(
            "Fine-tune a pretrained model with LoRA, by plain weight decay (default) or by "
            "marginal-likelihood training (--marglik). A YAML file (--config) gives defaults; "
            "every flag below overrides it and may also be a key of that file."
        ),
    )
    parser.add_argument(
        "--config", type=str, default=None, help="YAML file of defaults for any flag below."
    )
    parser.add_argument(
        "--marglik",
        type=_str2bool,
        nargs="?",
        const=True,
        default=False,
        help="Train with MargLikTrainer: the prior (learned by the marginal likelihood) replaces "
        "weight decay, which is set to 0. Without it: transformers.Trainer with the config's "
        "weight_decay.",
    )
    parser.add_argument(
        "--select",
        type=str,
        action="append",
        default=None,
        metavar="KEY=V1,V2",
        help="With --marglik: train every combination of these values (repeat the flag for more "
        "keys; a list flag's items joined by '+', e.g. lora_target_modules=query,query+value) "
        "and keep the one of the highest evidence (log marginal likelihood per data point). "
        "Candidates go to output_dir/candidates/<i>/, the chosen one's files to output_dir, "
        "with selection.json. In YAML: select: {lora_r: [4, 8]}.",
    )
    parser.set_defaults(**RECIPE_DEFAULTS)
    if task == "sft":
        parser.set_defaults(likelihood="causal_lm", backend="ggn-mc", predictive_prior="marglik")
    return parser


def _training_class(task: str | None):
    """The marginal-likelihood training arguments of ``task`` (a :class:`RecipeError` naming
    the install when ``task='sft'`` and TRL is missing)."""
    if task != "sft":
        from ..training_args import MargLikTrainingArguments

        return MargLikTrainingArguments
    try:
        from ..sft import MargLikSFTConfig
    except ImportError:
        raise RecipeError("task='sft' needs TRL: pip install hf_marglik[trl].") from None
    return MargLikSFTConfig


def _task(argv: list[str] | None, config: str | None) -> str | None:
    """``--task`` from the command line, else the config file's ``task`` (read leniently: the
    file is checked once the parser is built)."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--task", default=None)
    try:
        known, _ = pre.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise RecipeError(str(e)) from None
    if known.task is not None or config is None or not Path(config).is_file():
        return known.task
    try:
        data = yaml.safe_load(Path(config).read_text())
    except yaml.YAMLError:
        return None
    return data.get("task") if isinstance(data, dict) else None


def valid_keys(parser) -> list[str]:
    return sorted(a.dest for a in parser._actions if a.dest not in _CLI_ONLY)


def load_yaml(path: str | os.PathLike, keys: list[str]) -> dict[str, Any]:
    """Read a YAML config (a flat mapping of flag names to values) and check its keys."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"Config file {str(p)!r} does not exist.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"Config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"Config file {str(p)!r} must be a mapping of option names to values.")
    valid = set(keys)
    for key in data:
        if key not in valid:
            raise RecipeError(
                f"Unknown key {key!r} in config file {str(p)!r}.{nearest(str(key), valid)} "
                f"Valid keys (any flag of --help): {', '.join(sorted(valid))}."
            )
    return data


def _type_hints(task: str | None = None) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for cls in (ModelArguments, DataArguments, LoraArguments, _training_class(task)):
        hints.update(typing.get_type_hints(cls))
    return hints


def _admits(hint: Any, kind: type) -> bool:
    """Whether the annotation ``hint`` admits values of ``kind`` (``NoneType``, list, dict)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else ()
    return any((typing.get_origin(h) or h) is kind for h in (options or (hint,)))


_UnionType = type(int | None)


def _is_bool_flag(action) -> bool:
    return getattr(action.type, "__name__", "") in ("string_to_bool", "_str2bool")


def _expected(action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(repr(getattr(c, "value", c)) for c in action.choices)
    if _is_bool_flag(action):
        return "true or false"
    return {int: "an integer", float: "a number", str: "a string"}.get(action.type, "a string")


def _convert(action, value: Any) -> Any:
    """``value`` as the flag's own conversion gives it; ``TypeError``/``ValueError`` if wrong."""
    t = action.type
    if _is_bool_flag(action):
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return t(value)
        raise TypeError(value)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(value)
    if t is int and isinstance(value, float):
        raise TypeError(value)
    if t in (int, float, str):
        value = t(value)
    elif t is not None and isinstance(value, str):  # choices, enums: the flag's own conversion
        value = t(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(value)
    return value


def check_yaml_types(
    data: dict[str, Any], parser, path: str, task: str | None = None
) -> dict[str, Any]:
    """The YAML values converted as the same command-line flags would be, or a
    :class:`RecipeError` naming the key, the value and the type the key takes (a list for
    list-valued flags; null only where the field may be None)."""
    actions = {a.dest: a for a in parser._actions if a.nargs != 0}  # not the --no_x twins
    hints = _type_hints(task)
    out = {}
    for key, value in data.items():
        action, hint = actions[key], hints.get(key)
        many = action.nargs in ("+", "*")
        expected = _expected(action)
        if many:
            expected = "a list of " + {"a string": "strings"}.get(expected, expected)
        shown = "null" if value is None else repr(value)
        problem = f"Config file {path!r}: {key}: {shown} is not valid; {key} takes {expected}"
        if value is None:
            if hint is not None and not _admits(hint, type(None)):
                raise RecipeError(f"{problem} (it cannot be null).")
            out[key] = None
            continue
        try:
            if many:
                if not isinstance(value, list):
                    raise TypeError(value)
                out[key] = [_convert(action, v) for v in value]
            elif isinstance(value, list | dict):
                if hint is None or not _admits(hint, type(value)):
                    raise TypeError(value)
                out[key] = value
            else:
                out[key] = _convert(action, value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            example = " (a YAML list: [a, b])" if many and not isinstance(value, list) else ""
            raise RecipeError(f"{problem}{example}.") from None
    return out


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Parse ``argv`` (default ``sys.argv[1:]``) with the YAML defaults into a :class:`RunConfig`."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--marglik", type=_str2bool, nargs="?", const=True, default=None)
    pre.add_argument("--output_dir", default=None)
    try:
        known, _ = pre.parse_known_args(argv)
    except argparse.ArgumentError as e:
        raise RecipeError(str(e)) from None

    task = _task(argv, known.config)
    parser = make_parser(task)
    cfg: dict[str, Any] = {}
    yaml_select = None
    if known.config is not None:
        cfg = load_yaml(known.config, valid_keys(parser))
        yaml_select = cfg.pop("select", None)
        cfg = check_yaml_types(cfg, parser, known.config, task)
        parser.set_defaults(**cfg)
    marglik = known.marglik if known.marglik is not None else bool(cfg.get("marglik", False))
    if known.output_dir is None and cfg.get("output_dir") is None:
        stem = Path(known.config).stem if known.config else "default"
        parser.set_defaults(
            output_dir=str(Path("outputs") / (stem + ("-marglik" if marglik else "")))
        )

    try:
        namespace, remaining = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:  # a flag's value has the wrong type
        raise RecipeError(f"{e}. See --help.") from None
    if remaining:
        flags = [a for a in remaining if a.startswith("--")] or remaining
        options = [s for a in parser._actions for s in a.option_strings]
        raise RecipeError(
            f"Unknown argument {flags[0]!r}.{nearest(flags[0], options)} See --help for all flags."
        )
    values = vars(namespace)
    select = parse_selection(
        parser, values["select"], yaml_select, bool(values["marglik"]), known.config
    )
    try:  # the dataclasses' __post_init__ checks raise ValueError / TypeError
        model_args, data_args, lora_args = (
            cls(**_pick(values, cls)) for cls in (ModelArguments, DataArguments, LoraArguments)
        )
        training_args = _training_arguments(values, bool(values["marglik"]), task == "sft")
    except (ValueError, TypeError) as e:
        raise RecipeError(str(e)) from None
    return RunConfig(
        model_args,
        data_args,
        lora_args,
        training_args,
        bool(values["marglik"]),
        known.config,
        select,
        list(sys.argv[1:] if argv is None else argv),
    )


def _pick(values: dict[str, Any], cls) -> dict[str, Any]:
    return {f.name: values[f.name] for f in dataclasses.fields(cls) if f.init}


def _training_arguments(values: dict[str, Any], marglik: bool, sft: bool = False):
    """MargLikTrainingArguments (``sft``: MargLikSFTConfig) with weight decay 0 for --marglik
    (the prior replaces it); plain ``TrainingArguments`` (``sft``: TRL's ``SFTConfig``) with the
    configured weight decay otherwise."""
    from transformers import TrainingArguments

    from ..training_args import accelerator_available

    if sft:
        from trl import SFTConfig as TrainingArguments  # the plain run: TRL's SFTTrainer
    if marglik:
        cls = _training_class("sft" if sft else None)
        kwargs = _pick(values, cls)
        if kwargs["weight_decay"]:
            print(
                f"--marglik: weight_decay={kwargs['weight_decay']} is replaced by the learned "
                "prior (set to 0)."
            )
        kwargs["weight_decay"] = 0.0
        return cls(**kwargs)
    args = TrainingArguments(**_pick(values, TrainingArguments))
    if not accelerator_available():  # as MargLikTrainingArguments: no per-pass pin_memory warning
        args.dataloader_pin_memory = False
    return args
