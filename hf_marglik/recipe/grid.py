"""The candidates of ``scripts/train.py --marglik --select KEY=V1,V2[,...]``: parse, check and
enumerate them.

``--select`` is repeatable; a YAML config may hold ``select: {KEY: [V1, V2, ...]}`` (a flag for
the same key replaces the file's values). The candidates are every combination of the values
(the grid), in the order the keys were given, the first key varying slowest. A value of a list
flag (``lora_target_modules``) joins its items with ``+`` (``query+value``), or is a YAML list.

Keys that change the data, the inputs or the likelihood would make the candidates' evidences
incomparable, and a few keys belong to the selection itself: those are refused
(:data:`FIXED`), as is ``--select`` without ``--marglik``.
"""

from __future__ import annotations

import itertools
from typing import Any

from .errors import RecipeError, nearest

_SELECTION = "set by the selection itself"
_SAME_DATA = (
    "it changes the data, the inputs or the likelihood, so the candidates' evidences would not "
    "be comparable"
)
FIXED: dict[str, str] = {
    **dict.fromkeys(
        ("output_dir", "config", "marglik", "select", "resume_from_checkpoint", "logging_dir"),
        _SELECTION,
    ),
    **dict.fromkeys(
        (
            "task",
            "likelihood",
            "temperature",
            "num_labels",
            "model_name_or_path",
            "gguf_file",
            "tiny_random_model",
            "model_dtype",
            "dataset_name",
            "dataset_config_name",
            "train_file",
            "validation_file",
            "test_file",
            "text_column",
            "label_column",
            "class_names",
            "max_train_samples",
            "max_eval_samples",
            "max_test_samples",
            "split_seed",
            "max_seq_length",
            "prompt_template",
            "answer_prefix",
            "dict_key_x",
            "dict_key_y",
            "label_names",
        ),
        _SAME_DATA,
    ),
}
"""Keys that ``--select`` may not vary, with the reason."""


def varying_keys(parser) -> list[str]:
    """The keys ``--select`` may vary: every flag of the parser but :data:`FIXED`."""
    return sorted(a.dest for a in parser._actions if a.dest not in FIXED and a.dest != "help")


def _check_key(key: str, valid: list[str], where: str) -> None:
    if key in valid:
        return
    listed = f"Keys that can vary: {', '.join(valid)}."
    if key in FIXED:
        raise RecipeError(f"{where}: {key!r} cannot vary: {FIXED[key]}. {listed}")
    raise RecipeError(f"{where}: unknown key {key!r}.{nearest(key, valid)} {listed}")


def _tokens(value: Any, many: bool, where: str) -> tuple[str, ...]:
    """The command-line tokens of one candidate value."""
    if value is None:
        raise RecipeError(f"{where}: null is not a candidate value.")
    if isinstance(value, list):
        if not many:
            raise RecipeError(f"{where}: {value!r} is a list, but the key takes one value.")
        return tuple(str(v) for v in value)
    if isinstance(value, bool):
        return ("true" if value else "false",)
    if isinstance(value, dict):
        raise RecipeError(f"{where}: {value!r} is not a candidate value.")
    text = str(value).strip()
    if not text:
        raise RecipeError(f"{where}: an empty value.")
    return tuple(t.strip() for t in text.split("+")) if many else (text,)


def parse_selection(
    parser, specs: list[str] | None, from_yaml: Any, marglik: bool, config: str | None
) -> dict[str, list[tuple[str, ...]]] | None:
    """The grid: for each key (in the order given: the YAML file's, then new command-line
    keys), its candidate values as command-line tokens; None without ``--select``. A
    :class:`RecipeError` for an unknown or fixed key, an empty or repeated value list, a key
    given twice on the command line, or a selection without ``--marglik``."""
    if not specs and from_yaml is None:
        return None
    if not marglik:
        raise RecipeError(
            "--select chooses among --marglik runs by their evidence (log marginal likelihood "
            "per data point): add --marglik."
        )
    valid = varying_keys(parser)
    many = {a.dest for a in parser._actions if a.nargs in ("+", "*")}
    grid: dict[str, list[tuple[str, ...]]] = {}
    if from_yaml is not None:
        where = f"Config file {config!r}: select"
        if not isinstance(from_yaml, dict) or not from_yaml:
            raise RecipeError(f"{where} must map keys to lists of values: {{lora_r: [4, 8]}}.")
        for key, values in from_yaml.items():
            _check_key(str(key), valid, where)
            if not isinstance(values, list):
                values = [values]
            grid[key] = [_tokens(v, key in many, f"{where}: {key}") for v in values]
    seen = set()
    for spec in specs or []:
        where = f"--select {spec}"
        key, eq, text = spec.partition("=")
        key = key.strip().removeprefix("--")
        if not eq:
            raise RecipeError(f"{where}: write KEY=V1,V2 (e.g. --select lora_r=4,8).")
        _check_key(key, valid, where)
        if key in seen:
            raise RecipeError(f"{where}: {key!r} is given twice; list all its values once.")
        seen.add(key)
        items = text.split(",") if text.strip() else []
        grid[key] = [_tokens(v, key in many, where) for v in items]
    for key, values in grid.items():
        if not values:
            raise RecipeError(f"--select {key}: the list of values is empty; give at least one.")
        if len(set(values)) < len(values):
            raise RecipeError(f"--select {key}: a value is listed twice.")
    return grid


def candidates(grid: dict[str, list[tuple[str, ...]]]) -> list[dict[str, tuple[str, ...]]]:
    """Every combination of the grid's values, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def flags(setting: dict[str, tuple[str, ...]]) -> list[str]:
    """The command-line flags of one candidate."""
    return [t for key, tokens in setting.items() for t in (f"--{key}", *tokens)]


def without_select(argv: list[str]) -> list[str]:
    """``argv`` without its ``--select`` flags."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--select":
            skip = True
        elif not arg.startswith("--select="):
            out.append(arg)
    return out
