"""``MargLikSFTTrainer`` / ``MargLikSFTConfig``: marginal-likelihood training (Immer et al., ICML
2021, Algorithm 1) inside TRL's ``SFTTrainer`` (optional: ``pip install hf_marglik[trl]``).

Everything marginal-likelihood training does (the log joint, the schedule, the curvature fits,
the hyper-steps, the logs, checkpoints and resume, the best-marglik restore, ``laplace``,
``margliks``, ``losses``, ``n_data``) is :class:`~hf_marglik.trainer.MargLikTrainerMixin`, the
same code as :class:`~hf_marglik.MargLikTrainer`. TRL does what it does for ``SFTTrainer``: the
dataset formats (plain text, conversational ``messages`` through the tokenizer's chat template,
prompt-completion), ``peft_config=``, completion-only and assistant-only labels, padding-free
batches and packing, and its collator. This module adds only what joins the two:

* The likelihood is one categorical per target token (``likelihood="causal_lm"``): a token is a
  data point exactly when TRL labels it (``labels != -100``; prompt tokens, non-assistant turns
  and padding are -100), after the causal shift (``labels[:, 1:]``), which is also what TRL's
  own loss counts. ``n_data`` is their number over the training set.
* The loss is computed from the full logits (the curvature needs them): TRL's fused LM head
  (``fused_lm_head=True``, which never builds them) is not used, so ``loss_type="nll"`` (and
  its deprecated alias ``"chunked_nll"``) give the same likelihood as TRL's loss;
  ``loss_type="dft"`` is not a log likelihood and is refused.
* Packing (``packing=True``, strategies ``"bfd"`` / ``"bfd_split"``) and ``padding_free=True``
  are supported: TRL's collator flattens a batch into one row with ``position_ids`` restarting
  at every sequence and labels -100 at each sequence start; transformers then builds a
  block-diagonal attention mask from the ``position_ids`` (only without an attention mask and
  without a KV cache, so the model's ``config.use_cache`` is kept False), so the sequences of
  a pack do not attend to each other, in training and in the curvature pass, and ``N`` counts
  every packed sequence's target tokens. Refused: ``packing_strategy="wrapped"`` (sequences are
  cut and attend across the cut), ``kfac_approx="reduce"`` (it averages over a row, which holds
  several sequences), ``pad_to_multiple_of`` (its padding would enter the curvature) and
  ``eval_packing=True`` without padding-free training batches (TRL's collator would then let
  packed evaluation sequences attend to each other).
* TRL's ``entropy``, ``mean_token_accuracy`` and ``num_tokens`` are logged as ``SFTTrainer``
  logs them (computed from the logits).
* Bad inputs are refused before TRL prepares the data: a dataset without the fields TRL needs,
  conversational data without a chat template, the settings above, a likelihood other than
  ``"causal_lm"``, ``backend="ggn"`` over a vocabulary larger than
  :data:`~hf_marglik.columns.MAX_EXACT_OUTPUTS`, an MoE auxiliary loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from trl import SFTConfig, SFTTrainer, is_conversational, is_conversational_from_value
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
except ImportError as err:  # hf_marglik.__getattr__ turns this into an install hint
    raise ImportError(
        "MargLikSFTTrainer and MargLikSFTConfig need TRL: pip install hf_marglik[trl] "
        f"(or pip install 'trl>=1.16'). ({err})"
    ) from err

from .batches import IGNORE_INDEX
from .columns import check_outputs
from .options import KFACApprox, Likelihood
from .trainer import MargLikTrainerMixin
from .training_args import MargLikArguments

__all__ = ["MargLikSFTConfig", "MargLikSFTTrainer"]

PACKING_STRATEGIES = ("bfd", "bfd_split")
"""TRL's packing strategies that keep sequence boundaries (their batches are padding-free)."""
NON_MODEL_KEYS = ("completion_mask", "assistant_masks", "seq_lengths")
"""Mask columns of TRL's data preparation that a custom collator may pass through: folded into
``labels`` by TRL, never model inputs."""


@dataclass
class MargLikSFTConfig(MargLikArguments, SFTConfig):
    """Arguments of :class:`MargLikSFTTrainer`: all of TRL's ``SFTConfig`` (with its defaults)
    plus the marginal-likelihood settings of :class:`~hf_marglik.training_args.MargLikArguments`,
    with two defaults for language models: ``likelihood="causal_lm"`` (the only one allowed)
    and ``backend="ggn-mc"`` (an exact GGN needs one backward pass per vocabulary entry).

    Refused here, each with the setting to use: ``likelihood`` other than ``"causal_lm"``;
    ``loss_type="dft"``; ``packing_strategy="wrapped"``; ``kfac_approx="reduce"`` or
    ``pad_to_multiple_of`` with padding-free batches (``packing`` or ``padding_free``);
    ``eval_packing=True`` without them (see :mod:`hf_marglik.sft`).
    """

    likelihood: str = field(
        default="causal_lm",
        metadata={"help": "Likelihood: 'causal_lm' (one categorical per target token)."},
    )
    backend: str = field(
        default="ggn-mc",
        metadata={
            "help": "Curvature: 'ggn-mc' (Monte-Carlo GGN, default), 'ef' (empirical Fisher) "
            "or 'ggn' (exact GGN: one backward per vocabulary entry, small vocabularies only)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.likelihood != Likelihood.CAUSAL_LM:
            raise ValueError(
                f"likelihood={self.likelihood.value!r} does not fit supervised fine-tuning, whose "
                "targets are the tokens TRL labels; set likelihood='causal_lm' (the default of "
                "MargLikSFTConfig), or use MargLikTrainer for classification or regression."
            )
        if self.loss_type != "nll":  # TRL maps the deprecated "chunked_nll" to "nll"
            raise ValueError(
                f"loss_type={self.loss_type!r} is not a log likelihood, so the Laplace marginal "
                "likelihood would not be that of the trained objective; set loss_type='nll' "
                "(TRL's default, computed here from the full logits)."
            )
        if self.packing and self.packing_strategy not in PACKING_STRATEGIES:
            raise ValueError(
                f"packing_strategy={self.packing_strategy!r} cuts sequences and lets the pieces "
                "of a block attend to each other, so the curvature would not be that of the "
                "sequences; set packing_strategy='bfd' (TRL's default) or 'bfd_split', or "
                "packing=False."
            )
        if self.trains_padding_free:
            if self.kfac_approx == KFACApprox.REDUCE:
                raise ValueError(
                    "kfac_approx='reduce' averages each row of a batch, and a padding-free row "
                    "(packing, padding_free) holds several sequences; set kfac_approx='expand' "
                    "(or None), or packing=False and padding_free=False."
                )
            if self.pad_to_multiple_of is not None:
                raise ValueError(
                    f"pad_to_multiple_of={self.pad_to_multiple_of} pads padding-free batches "
                    "(packing, padding_free) without an attention mask, so the padding would "
                    "enter the curvature; set pad_to_multiple_of=None."
                )
        if self.eval_packing and not self.trains_padding_free:
            raise ValueError(
                "eval_packing=True packs the evaluation data, but without padding-free batches "
                "(packing=True or padding_free=True) TRL's collator lets the packed sequences "
                "attend to each other; set eval_packing=None (or False), or packing=True."
            )

    @property
    def trains_padding_free(self) -> bool:
        """Whether TRL's collator flattens batches (``padding_free``, or packing with a
        strategy that keeps sequence boundaries), as ``SFTTrainer.padding_free`` decides."""
        return bool(
            self.padding_free or (self.packing and self.packing_strategy in PACKING_STRATEGIES)
        )


_SFT_PARAMS = inspect.signature(SFTTrainer.__init__)


class MargLikSFTTrainer(MargLikTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` that learns the prior precision by the Laplace marginal likelihood
    while it trains on the log joint: swap it for ``SFTTrainer`` and :class:`MargLikSFTConfig`
    for ``SFTConfig``. Everything it adds is described in
    :class:`~hf_marglik.trainer.MargLikTrainerMixin`; what is specific to SFT (targets, packing,
    refused settings) in :mod:`hf_marglik.sft`."""

    def __init__(self, *args, **kwargs):
        bound = _SFT_PARAMS.bind_partial(self, *args, **kwargs).arguments
        _check_inputs_before_preparation(bound)
        super().__init__(*args, **kwargs)
        check_outputs(self.model.get_output_embeddings().out_features, self.args.backend)
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError(
                "The model adds a Mixture-of-Experts load-balancing loss, which is not part of "
                "the likelihood; set router_aux_loss_coef=0.0."
            )
        if self.padding_free:
            # transformers finds the sequences of a padding-free row from its position_ids
            # only without a KV cache. TRL passes use_cache=False in its own forwards; ours
            # (training, curvature, evaluation) read the model's config, which Trainer sets to
            # args.use_cache (False unless asked for; older transformers leave it True)
            config = self.model.config
            for c in {id(c): c for c in (config, config.get_text_config())}.values():
                c.use_cache = False
        if not isinstance(self.data_collator, DataCollatorForLanguageModeling):
            self.data_collator = _WithoutMaskColumns(self.data_collator)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The log joint of :meth:`MargLikTrainerMixin.compute_loss
        <hf_marglik.trainer.MargLikTrainerMixin.compute_loss>` (per target token), and TRL's
        ``entropy`` / ``mean_token_accuracy`` / ``num_tokens`` metrics; the outputs carry
        ``logits`` as TRL's ``prediction_step`` reads them."""
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        self._token_metrics(outputs["logits"], inputs, "train" if model.training else "eval")
        if return_outputs:
            return loss, CausalLMOutputWithPast(logits=outputs["logits"])
        return loss

    @torch.no_grad()
    def _token_metrics(self, logits: torch.Tensor, inputs: Mapping, mode: str) -> None:
        labels = inputs[self.args.dict_key_y][:, 1:]
        mask = labels != IGNORE_INDEX
        attention = inputs.get("attention_mask")
        if attention is not None:
            mask = mask & attention[:, 1:].bool()
        lg = logits[:, :-1][mask].float()
        logp = torch.log_softmax(lg, dim=-1)
        gather = self.accelerator.gather_for_metrics
        n = gather(mask.sum()).sum()
        entropy = gather(-(logp.exp() * logp).sum()).sum()
        correct = gather((lg.argmax(-1) == labels[mask]).sum()).sum()
        metrics = self._metrics[mode]
        metrics["entropy"].append(float(entropy / n) if n > 0 else 0.0)
        metrics["mean_token_accuracy"].append(float(correct / n) if n > 0 else 0.0)
        if mode == "train":  # tokens seen, as SFTTrainer counts them (padding excluded)
            if attention is not None:
                local = attention.sum()
            else:
                local = torch.tensor(inputs["input_ids"].numel(), device=labels.device)
            self._total_train_tokens += int(gather(local).sum()) // getattr(self, "_tp_size", 1)
        metrics["num_tokens"] = [self._total_train_tokens]


class _WithoutMaskColumns:
    """A custom data collator whose batches lose TRL's mask columns (:data:`NON_MODEL_KEYS`):
    every key of a batch but the labels is passed to the model."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        if isinstance(batch, Mapping):
            batch = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
        return batch


# ---------------------------------------------------------------------------- input checks
def _check_inputs_before_preparation(bound: dict) -> None:
    """The arguments, and the fields of every dataset, before TRL tokenizes anything."""
    args = bound.get("args")
    if not isinstance(args, MargLikSFTConfig):
        got = "no args" if args is None else type(args).__name__
        raise TypeError(
            f"MargLikSFTTrainer needs args=MargLikSFTConfig(...) (got {got}): TRL's SFTConfig "
            "plus the marginal-likelihood settings."
        )
    kwargs = args.dataset_kwargs if isinstance(args.dataset_kwargs, dict) else {}
    if kwargs.get("skip_prepare_dataset"):
        return  # the datasets are the collator's business (TRL checks their labels)
    eval_ds = bound.get("eval_dataset")
    datasets = {"train": bound.get("train_dataset")}
    if isinstance(eval_ds, Mapping):
        datasets.update({f"eval ({k})": v for k, v in eval_ds.items()})
    elif eval_ds is not None:
        datasets["eval"] = eval_ds
    for name, dataset in datasets.items():
        if dataset is not None:
            _check_dataset(name, dataset, args, bound)


def _columns(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is None:  # an IterableDataset without known features
        names = list(next(iter(dataset)).keys())
    return list(names)


def _check_dataset(name: str, dataset, args: MargLikSFTConfig, bound: dict) -> None:
    columns = _columns(dataset)
    if "input_ids" in columns:
        return  # pre-tokenized: TRL takes labels (or assistant / completion masks) as they are
    if next(iter(dataset), None) is None:
        return  # empty: the marginal-likelihood trainer reports it
    example = next(iter(dataset))
    conversational = is_conversational(example) or is_conversational_from_value(example)
    prompt_completion = "prompt" in columns and "completion" in columns
    text = args.dataset_text_field in columns or bound.get("formatting_func") is not None
    if not (prompt_completion or conversational or text):
        listed = ", ".join(repr(c) for c in columns)
        raise ValueError(
            f"The {name} dataset has the columns {listed}, none of TRL's dataset formats: a "
            f"text column (dataset_text_field={args.dataset_text_field!r}), conversational "
            "'messages' (a list of {'role': ..., 'content': ...} dicts), 'prompt' and "
            "'completion' (strings or message lists), or pre-tokenized 'input_ids'. Rename the "
            "columns, set dataset_text_field, or pass formatting_func."
        )
    processor = bound.get("processing_class")
    if conversational and processor is not None and args.chat_template_path is None:
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(
                f"The {name} dataset is conversational, but the processing_class "
                f"({type(processor).__name__}) has no chat template to turn its messages into "
                "tokens. Set tokenizer.chat_template (a Jinja template string), or "
                "chat_template_path in MargLikSFTConfig (a .jinja file or a tokenizer folder)."
            )
