"""The ``sft`` task: each article as a chat, the user asking for its topic and the assistant
answering with the class name, trained by TRL's ``SFTTrainer`` (plain) or
:class:`~hf_marglik.MargLikSFTTrainer` (``--marglik``), both needing ``pip install
hf_marglik[trl]``.

The training and validation splits are handed to the trainer as TRL's conversational
prompt-completion examples (``{"prompt": [user turn], "completion": [assistant turn]}``): TRL
renders them with the tokenizer's chat template and labels only the completion (the answer and
its end-of-turn tokens). The article is cut so that the rendered chat fits ``max_seq_length``
tokens. The test split is tokenised here the same way (:func:`encode_chat`, checked against
TRL's preparation in the tests), so that the recipe's per-token test metrics read it directly.
"""

from __future__ import annotations

from .arguments import DEFAULT_PROMPTS, DataArguments
from .data import TextData
from .encode import IGNORE_INDEX
from .errors import RecipeError


def trainer_class(marglik: bool):
    """``MargLikSFTTrainer`` with ``--marglik``, else TRL's ``SFTTrainer``; a
    :class:`RecipeError` naming the install when TRL is missing."""
    try:
        if marglik:
            from ..sft import MargLikSFTTrainer as cls
        else:
            from trl import SFTTrainer as cls
    except ImportError:
        raise RecipeError(
            "task='sft' trains with TRL's SFTTrainer: pip install hf_marglik[trl]."
        ) from None
    return cls


def chat(question: str, answer: str) -> tuple[list[dict], list[dict]]:
    """The prompt and completion messages of one example."""
    return [{"role": "user", "content": question}], [{"role": "assistant", "content": answer}]


def _ids(tokenizer, messages, **kw) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
    return list(out["input_ids"])


def encode_chat(tokenizer, prompt: list[dict], completion: list[dict]) -> dict[str, list[int]]:
    """``input_ids`` of the rendered chat and ``labels`` that are -100 up to where the prompt
    (with the assistant's generation prompt) stops being a prefix, as TRL labels a
    conversational prompt-completion example."""
    head = _ids(tokenizer, prompt, add_generation_prompt=True)
    ids = _ids(tokenizer, prompt + completion)
    n = 0
    while n < min(len(head), len(ids)) and head[n] == ids[n]:
        n += 1
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * n + ids[n:]}


def _fit(tokenizer, template: str, text: str, answer: str, max_len: int) -> tuple:
    """The chat of ``text`` cut (in tokens) so that it has at most ``max_len`` tokens."""
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    budget = len(tokens)
    for _ in range(8):  # decoding a cut and re-encoding it can change the count a little
        cut = tokenizer.decode(tokens[:budget]) if budget < len(tokens) else text
        prompt, completion = chat(template.replace("{text}", cut), answer)
        n = len(_ids(tokenizer, prompt + completion))
        if n <= max_len:
            return prompt, completion
        budget = max(0, budget - (n - max_len))
    raise RecipeError(
        f"max_seq_length={max_len} is too short for the chat template and the answer; raise it."
    )


def chat_splits(data: TextData, tokenizer, args: DataArguments) -> dict:
    """The splits as TRL datasets: ``train`` and ``validation`` as conversational
    prompt-completion examples, ``test`` tokenised by :func:`encode_chat`."""
    from datasets import Dataset

    if getattr(tokenizer, "chat_template", None) is None:
        raise RecipeError(
            "task='sft' renders each example with the tokenizer's chat template, and this "
            "tokenizer has none; use a chat (instruct) model."
        )
    template = args.prompt_template or DEFAULT_PROMPTS["sft"]
    out = {}
    for name, ds in data.splits.items():
        rows = [
            _fit(tokenizer, template, text, data.class_names[y], args.max_seq_length)
            for text, y in zip(ds["text"], ds["label"])
        ]
        if name == "test":
            encoded = [encode_chat(tokenizer, p, c) for p, c in rows]
            out[name] = Dataset.from_list(encoded)
        else:
            out[name] = Dataset.from_dict(
                {"prompt": [p for p, _ in rows], "completion": [c for _, c in rows]}
            )
    return out
