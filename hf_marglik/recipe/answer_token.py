"""Answer-token classification with a causal language model (Laplace-LoRA style).

The prompt ends where the answer would begin ("...Topic:"); class ``c`` is the first token of
``answer_prefix + class_names[c]``. The classifier's logits are the language model's next-token
logits at the last non-padding position, restricted to those ``K`` tokens, so a ``K``-way
categorical likelihood (and so a classification Laplace) applies to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .errors import RecipeError


def answer_token_ids(tokenizer, class_names: list[str], prefix: str = " ") -> list[int]:
    """The first token id of ``prefix + name`` for each class; they must all differ."""
    ids = []
    for name in class_names:
        tokens = tokenizer(prefix + name, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise RecipeError(f"Class name {name!r} gives no tokens.")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        pieces = {n: tokenizer.convert_ids_to_tokens(i) for n, i in zip(class_names, ids)}
        raise RecipeError(
            f"The class names' first tokens are not distinct ({pieces}); rename the classes "
            "(--class_names) or change --answer_prefix."
        )
    return ids


def last_positions(attention_mask: Tensor) -> Tensor:
    """Index of the last non-padding token of each row (left or right padding)."""
    length = attention_mask.shape[1]
    return length - 1 - attention_mask.long().flip(-1).argmax(-1)


class AnswerTokenClassifier(nn.Module):
    """``K``-way classifier from a causal LM: logits ``h_last @ W[class_token_ids]ᵀ``.

    ``lm`` is a (peft-wrapped) ``*ForCausalLM``. Only the ``K`` rows of the output embedding are
    applied, to the last non-padding hidden state; the result equals the LM's full next-token
    logits at that position, restricted to the class tokens.
    """

    def __init__(self, lm: nn.Module, class_token_ids: list[int]):
        super().__init__()
        self.lm = lm
        self.register_buffer("class_token_ids", torch.tensor(class_token_ids), persistent=False)
        self.num_labels = len(class_token_ids)

    def _base(self) -> nn.Module:
        get_base = getattr(self.lm, "get_base_model", None)
        return get_base() if callable(get_base) else self.lm

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        base = self._base()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)[0]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        h_last = hidden[rows, last_positions(attention_mask)]
        head = base.get_output_embeddings()
        logits = F.linear(h_last, head.weight[self.class_token_ids])
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[self.class_token_ids]
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
