"""Turn texts into token ids for each task, and pad them into batches.

A prompt template ``prefix{text}suffix`` is tokenised piece by piece so that only the article is
truncated: ``[specials] prefix text[:budget] suffix [specials]`` has at most ``max_seq_length``
tokens. Targets per task:

- ``sequence_classification`` / ``answer_token``: ``labels`` is the class index of the example.
- ``causal_lm``: ``labels`` equals ``input_ids`` on the article tokens and -100 on the special,
  prompt and padding tokens (the model shifts them by one position itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .arguments import DEFAULT_PROMPTS, DataArguments
from .data import TextData

IGNORE_INDEX = -100


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (``[CLS]`` / ``[SEP]`` for BERT)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    return [], []


def split_template(template: str) -> tuple[str, str, str]:
    """``prefix{text}suffix`` -> (prefix without trailing whitespace, that whitespace, suffix)."""
    prefix, suffix = template.split("{text}", 1)
    stripped = prefix.rstrip()
    return stripped, prefix[len(stripped) :], suffix


def encode_splits(
    data: TextData, tokenizer, task: str, args: DataArguments, class_names: list[str]
) -> dict:
    """Tokenise every split: columns ``input_ids``, ``attention_mask``, ``labels``."""
    template = args.prompt_template or DEFAULT_PROMPTS[task]
    head, tail = special_tokens(tokenizer)

    def tok(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def fn(batch):
        n = len(batch["text"])
        labels = batch.get("label", [None] * n)
        names = [class_names[y] if y is not None and y < len(class_names) else "" for y in labels]
        filled = [template.replace("{label_name}", name) for name in names]
        parts = [split_template(t) for t in filled]
        prefixes = tok([p for p, _, _ in parts])
        suffixes = tok([s for _, _, s in parts])
        texts = tok([ws + text for (_, ws, _), text in zip(parts, batch["text"])])
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for pre, txt, suf, y in zip(prefixes, texts, suffixes, labels):
            budget = args.max_seq_length - len(head) - len(tail) - len(pre) - len(suf)
            txt = txt[: max(budget, 0)]
            ids = head + pre + txt + suf + tail
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            if task == "causal_lm":
                n_before = len(head) + len(pre)
                out["labels"].append(
                    [IGNORE_INDEX] * n_before + txt + [IGNORE_INDEX] * (len(suf) + len(tail))
                )
            else:
                out["labels"].append(y)
        return out

    return {
        name: ds.map(fn, batched=True, remove_columns=ds.column_names, desc=f"Tokenising {name}")
        for name, ds in data.splits.items()
    }


@dataclass
class PadCollator:
    """Pad a list of encoded examples on the right into a dict of tensors.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0, token-level
    ``labels`` with -100; a scalar label per example becomes a 1-d tensor.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)

        def pad(key: str, value: int) -> torch.Tensor:
            rows = [list(f[key]) + [value] * (length - len(f[key])) for f in features]
            return torch.tensor(rows, dtype=torch.long)

        batch = {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": pad("attention_mask", 0),
        }
        if "labels" in features[0]:
            if isinstance(features[0]["labels"], (list, tuple)):
                batch["labels"] = pad("labels", IGNORE_INDEX)
            else:
                batch["labels"] = torch.tensor([int(f["labels"]) for f in features])
        return batch
