"""Instruction tuning with the stock `transformers.Trainer`: chat template, loss on responses only, MoE callbacks,
resumable, the embedded task mixture by default."""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
)

from ..checkpoints.lineage import is_hub_id_shaped
from ..data import build_mixture, load_instruction_dataset
from ..data.sft import check_json_rows, ensure_chat_template, tokenize_for_sft
from ..hub.push import use_training_card_on_push
from ..hub.training import write_training_card
from ..modeling.configuration_hf_moe import ROUTER_AUX_LOSS_SCOPES
from ..moe_layers import find_moe_layers
from ..training.balancing import AuxLossFreeBalancingCallback, no_selection_bias_message
from ..training.callbacks import ExpertStatsCallback, NonFiniteGuardCallback, add_moe_callbacks
from ..training.freezing import FREEZE_TARGETS, freeze_moe
from ..training.optimizer_step import OptimizerStepCallback
from ..training.rollback import train_with_rollback
from .evaluate import check_model_path

logger = logging.getLogger(__name__)
LOAD_IN_4BIT_NEEDS_LORA = "`load_in_4bit` needs LoRA adapters to train (a 4-bit base is frozen): pass `lora_r` > 0"


@dataclass
class FinetuneArguments:
    """The model and data options of `hf-moe finetune`; the training options are [`FinetuneTrainingArguments`]."""

    model_path: str = field(default="out/SmolLM2-135M-Instruct-hf_moe-8x2", metadata={
        "help": "model folder (hf_moe, a transformers MoE such as Mixtral / Qwen3-MoE, or dense) with its tokenizer"})
    dataset: str | None = field(default=None, metadata={
        "help": "datasets name/folder or .json/.jsonl; empty = the embedded task mixture"})
    train_per_family: int = field(default=200, metadata={"help": "embedded mixture: training examples per family"})
    eval_per_family: int = field(default=10, metadata={"help": "embedded mixture: eval examples per family"})
    max_length: int = 256
    router_aux_loss_scope: str | None = field(default=None, metadata={
        "help": "micro_batch | global_batch: override the model's load-balancing scope "
                "(docs/training.md#load-balancing-scope)"})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "override the load-balancing weight"})
    router_bias_update_rate: float | None = field(default=None, metadata={
        "help": "auxiliary-loss-free balancing: gamma of the routers' selection bias, updated after every optimizer "
                "step (hf_moe models get the bias; DeepSeek-V3, GLM-4.5-MoE, ... have one); 0 = off "
                "(docs/training.md#balancing)"})
    router_sequence_aux_loss_coef: float | None = field(default=None, metadata={
        "help": "hf_moe models: weight of DeepSeek-V3's sequence-wise balance loss (e.g. 1e-4 with the bias)"})
    freeze: str | None = field(default=None, metadata={"help": "router | experts | moe (FLAN-MoE ablations)"})
    nonfinite_max_consecutive: int = field(default=3, metadata={"help": "rollback after N non-finite steps in a row"})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: load the base in bitsandbytes 4-bit NF4, experts included (needs --lora_r)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = train the full model"})
    lora_targets: str = field(default="attention,experts", metadata={
        "help": "comma-separated LoRA targets: attention, experts, router"})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: 2 * lora_r)"})

    def __post_init__(self):
        # At parsing, so that a wrong value or a malformed file is one line before any model loads.
        if self.freeze is not None and self.freeze not in FREEZE_TARGETS:
            raise ValueError(f"`freeze`={self.freeze!r} is invalid: choose one of {FREEZE_TARGETS}")
        if self.router_aux_loss_scope is not None and self.router_aux_loss_scope not in ROUTER_AUX_LOSS_SCOPES:
            raise ValueError(f"`router_aux_loss_scope`={self.router_aux_loss_scope!r} is invalid: choose one of "
                             f"{ROUTER_AUX_LOSS_SCOPES}")
        if self.lora_r < 0:
            raise ValueError(f"`lora_r`={self.lora_r} is invalid: 0 (train the full model) or a positive LoRA rank")
        if self.load_in_4bit and self.lora_r == 0:
            raise ValueError(LOAD_IN_4BIT_NEEDS_LORA)
        if self.lora_r > 0:
            from ..quantization.lora import parse_lora_targets  # peft itself is imported only when adapters attach

            parse_lora_targets(self.lora_targets)
        dataset = Path(self.dataset) if self.dataset else None
        if dataset is not None and dataset.suffix in (".json", ".jsonl") and dataset.is_file():
            check_json_rows(dataset)

    def check_paths(self, model: bool = True) -> None:
        """Raise, naming the path and what is expected, if `dataset` (or, with `model`, `model_path`) is a local path
        that does not exist or cannot be read. `build_trainer` runs it before anything loads (a model takes GBs and
        minutes); a name that could be a Hub id is left to the Hub."""
        if model:
            check_model_path(self.model_path)
        if not self.dataset:
            return
        dataset = Path(self.dataset)
        if not dataset.exists():
            if dataset.suffix in (".json", ".jsonl") or not is_hub_id_shaped(self.dataset):
                raise FileNotFoundError(f"`dataset`={self.dataset!r}: no such file or folder; expected a .json or "
                                        ".jsonl file of rows (instruction + response, or messages), a `datasets` "
                                        "folder, or a Hub dataset id (owner/name)")
        elif not os.access(dataset, os.R_OK):
            raise PermissionError(f"`dataset`={self.dataset!r}: not readable by this user")


@dataclass
class FinetuneTrainingArguments(TrainingArguments):
    """`TrainingArguments` (every option: bf16, gradient_checkpointing, push_to_hub, report_to, ...) with the
    defaults of `hf-moe finetune`. `--resume_from_checkpoint latest` resumes from the newest checkpoint."""

    output_dir: str | None = field(default="runs/finetune", metadata={"help": "checkpoints, logs, final model"})
    max_steps: int = 100
    warmup_steps: float = 5
    lr_scheduler_type: str = "cosine"
    logging_steps: float = 10
    save_steps: float = 50
    eval_strategy: str = "steps"
    eval_steps: float | None = 50
    report_to: None | str | list[str] = "tensorboard"
    optim: str = "adamw_torch_fused"  # 8x faster than the foreach AdamW on CPU for MoE-sized parameter sets
    seed: int = 0
    data_seed: int | None = 0
    # Without a GPU, `use_cpu` must be set for `accelerate launch --num_processes N` to form a CPU process group;
    # left False, each process silently trains alone on its shard (found by the DDP test).
    use_cpu: bool = not torch.cuda.is_available()


def instruction_splits(args: FinetuneArguments, seed: int = 0):
    """(train, eval) datasets of `messages` rows: the embedded mixture's train/validation, or the user's dataset."""
    if args.dataset is None:
        mixture = build_mixture(args.train_per_family, args.eval_per_family, seed=seed)
        return mixture["train"], mixture["validation"]
    train = load_instruction_dataset(args.dataset)
    split = train.train_test_split(test_size=min(0.05, 200 / max(len(train), 1)), seed=seed)
    return split["train"], split["test"]


def tokenized_splits(args: FinetuneArguments, tokenizer, seed: int = 0, splits=None):
    """(train, eval) tokenised datasets of `splits` (default: `instruction_splits(args, seed)`)."""
    train, evaluation = splits or instruction_splits(args, seed)

    def tokenize(row):
        return tokenize_for_sft(tokenizer, row["messages"], args.max_length)

    columns = train.column_names
    return train.map(tokenize, remove_columns=columns), evaluation.map(tokenize, remove_columns=columns)


def build_trainer(args: FinetuneArguments, training_args: TrainingArguments, model=None, tokenizer=None,
                  extra_callbacks=()) -> Trainer:
    """A stock Trainer set up for MoE instruction tuning (also used by the tests)."""
    args.check_paths(model=model is None or tokenizer is None)
    splits = instruction_splits(args, training_args.seed)  # read before the model: a data error is found in seconds
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(args.model_path)
    ensure_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model or load_for_finetuning(args.model_path, args.load_in_4bit, args.lora_r, args.lora_targets,
                                         args.lora_alpha)
    if args.router_aux_loss_scope is not None:
        model.config.router_aux_loss_scope = args.router_aux_loss_scope
    if args.router_aux_loss_coef is not None:
        model.config.router_aux_loss_coef = args.router_aux_loss_coef
    if args.router_sequence_aux_loss_coef is not None:
        if not hasattr(model.config, "router_sequence_aux_loss_coef"):
            raise ValueError(f"`router_sequence_aux_loss_coef` applies to hf_moe models, not to model_type="
                             f"{model.config.model_type!r}")
        model.config.router_sequence_aux_loss_coef = args.router_sequence_aux_loss_coef
    if any(value is not None for value in (args.router_aux_loss_scope, args.router_aux_loss_coef,
                                           args.router_sequence_aux_loss_coef)):
        model.config.validate()
    update_rate = _set_up_selection_bias(model, args.router_bias_update_rate)
    if args.freeze:
        logger.info("froze %d parameters (%s)", freeze_moe(model, args.freeze), args.freeze)
    train, evaluation = tokenized_splits(args, tokenizer, splits=splits)
    callbacks = [NonFiniteGuardCallback(args.nonfinite_max_consecutive)]
    if find_moe_layers(model, warn=True):
        callbacks[:0] = [ExpertStatsCallback(), OptimizerStepCallback()]
        if update_rate:
            callbacks.insert(0, AuxLossFreeBalancingCallback(update_rate))
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                      processing_class=tokenizer, data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
                      callbacks=list(extra_callbacks))
    if any(isinstance(callback, ExpertStatsCallback) for callback in callbacks):
        use_training_card_on_push(trainer)  # trainer.push_to_hub() (and --push_to_hub) upload the fine-tuned card
    return add_moe_callbacks(trainer, *callbacks)


def _set_up_selection_bias(model, update_rate: float | None) -> float:
    """Apply `--router_bias_update_rate` to `model`; returns the gamma to train with (0: no bias balancing).

    hf_moe models get (or, with 0, lose) their selection bias; a model of another family must already have one
    (`e_score_correction_bias`). Without the option, an hf_moe model trains with the gamma of its config.
    """
    config = model.config
    if update_rate is None:
        return getattr(config, "router_bias_update_rate", 0.0) or 0.0
    if update_rate < 0:
        raise ValueError(f"`router_bias_update_rate`={update_rate!r} is invalid: must be >= 0 (0 = off)")
    if hasattr(model, "set_router_bias_update_rate"):  # hf_moe (also through a peft wrapper)
        model.set_router_bias_update_rate(update_rate)
    elif update_rate > 0 and not any(layer.selection_bias_name for layer in find_moe_layers(model)):
        raise ValueError(no_selection_bias_message(model))
    return update_rate


def run_finetune(args: FinetuneArguments, training_args: TrainingArguments) -> Path:
    """Train, then save the final model and tokenizer into `training_args.output_dir`; returns it."""
    trainer = build_trainer(args, training_args)
    resume = training_args.resume_from_checkpoint
    result = train_with_rollback(trainer, resume_from_checkpoint=True if resume == "latest" else resume)
    trainer.save_model(training_args.output_dir)
    write_training_card(trainer, dataset=args.dataset, data=None if args.dataset else (
        f"the embedded hf_moe task mixture ({args.train_per_family} training examples per family)"))
    logger.info("training done: %s", result.metrics)
    return Path(training_args.output_dir)


def load_for_finetuning(model_path: str, load_in_4bit: bool = False, lora_r: int = 0,
                        lora_targets="attention,experts", lora_alpha: int | None = None):
    """The model `hf-moe finetune` trains: full precision, or 4-bit (experts included) for QLoRA; wrapped with LoRA
    adapters on `lora_targets` when `lora_r > 0`."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if load_in_4bit and lora_r <= 0:
        raise ValueError(LOAD_IN_4BIT_NEEDS_LORA)
    quantization_config = None
    if load_in_4bit:
        quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 quantization_config=quantization_config)
    if load_in_4bit:
        from ..quantization.quantizer import use_generic_cpu_path_for_training

        use_generic_cpu_path_for_training(model)  # evaluation between steps must not stop the LoRA gradients
    if lora_r > 0:
        from ..quantization.lora import attach_moe_lora  # peft (and bitsandbytes) only when LoRA is asked for

        model = attach_moe_lora(model, lora_r, lora_targets, lora_alpha)
    return model
