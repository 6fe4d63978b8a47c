"""4-bit (experts included) against bfloat16 on one upcycled model: resident weight memory, max |Δlogit| and greedy
agreement on the `--verify` prompts, and forward time (median of repeats), all in one run. With the dense model it
was upcycled from, the same comparison for stock transformers' 4-bit of that dense model: the reference for what
NF4 itself costs, and the upcycled 4-bit model against it."""

import statistics
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from ..checkpoints.compare import SAMPLE_PROMPTS, chat_prompt_ids, compare_models, pad_token_id
from ..quantization.experts import unquantized_expert_parameters
from ..quantization.memory import resident_weight_bytes
from .evaluate import check_model_path


@dataclass
class QuantizationBenchmarkArguments:
    model_path: str = field(default="out/SmolLM2-135M-Instruct-hf_moe-8x2", metadata={
        "help": "an hf_moe folder (default: the output of `hf-moe upcycle`)"})
    quant_type: str = field(default="nf4", metadata={"help": "nf4 | fp4"})
    repeats: int = field(default=5, metadata={"help": "timed forwards per model (median reported)"})
    max_new_tokens: int = field(default=24, metadata={"help": "greedy tokens generated per prompt"})
    dense_model_path: str | None = field(default=None, metadata={
        "help": "the dense folder `model_path` was upcycled from: adds its bf16 vs 4-bit comparison (stock "
                "transformers' Linear4bit) as a reference"})

    def __post_init__(self):
        """At parsing, before anything loads (a missing folder would otherwise read as a malformed Hub id)."""
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"`quant_type`={self.quant_type!r} is invalid: choose nf4 or fp4")
        for name in ("repeats", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}`={getattr(self, name)!r} is invalid: a positive integer is required")
        check_model_path(self.model_path)


def _forward_seconds(model, inputs: list[torch.Tensor], repeats: int) -> float:
    """Median over `repeats` of one forward of every prompt (after one warm-up pass)."""
    times = []
    for index in range(repeats + 1):
        start = time.perf_counter()
        for ids in inputs:
            model(input_ids=ids)
        if index:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def benchmark_quantization(args: QuantizationBenchmarkArguments) -> dict:
    """One row per precision (bf16 reference, 4-bit) and the comparison between them."""
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    inputs = [chat_prompt_ids(tokenizer, prompt) for prompt in SAMPLE_PROMPTS]
    quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quant_type,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    models = {"bf16": AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.bfloat16).eval(),
              f"4-bit {args.quant_type}": AutoModelForCausalLM.from_pretrained(
                  args.model_path, dtype=torch.bfloat16, quantization_config=quantization_config).eval()}
    reference, quantized = models.values()
    left = unquantized_expert_parameters(quantized)
    if left:
        raise RuntimeError(f"expert tensors left in full precision: {left}")
    pad = pad_token_id(tokenizer)
    agreement = agreement_row(reference, quantized, inputs, args.max_new_tokens, pad)
    rows = [{"precision": name, "weight_MiB": round(resident_weight_bytes(model) / 2**20, 1),
             "forward_s": round(_forward_seconds(model, inputs, args.repeats), 4)} for name, model in models.items()]
    return {
        "model": args.model_path, "device": "cpu", "prompts": len(inputs), "rows": rows,
        "memory_ratio": round(rows[1]["weight_MiB"] / rows[0]["weight_MiB"], 3),
        "forward_time_ratio": round(rows[1]["forward_s"] / rows[0]["forward_s"], 2),
        **agreement,
        **({"dense_reference": _dense_reference(args.dense_model_path, quantization_config, inputs,
                                                 args.max_new_tokens, pad, quantized)}
           if args.dense_model_path else {}),
    }


def _dense_reference(dense_path: str, quantization_config, inputs, max_new_tokens: int, pad: int,
                     quantized_moe) -> dict:
    """Stock transformers on the dense model: bf16 vs 4-bit, and the upcycled 4-bit model vs the dense 4-bit one."""
    dense = AutoModelForCausalLM.from_pretrained(dense_path, dtype=torch.bfloat16).eval()
    dense_4bit = AutoModelForCausalLM.from_pretrained(dense_path, dtype=torch.bfloat16,
                                                      quantization_config=quantization_config).eval()
    return {"dense_4bit_vs_bf16": agreement_row(dense, dense_4bit, inputs, max_new_tokens, pad),
            "upcycled_4bit_vs_dense_4bit": agreement_row(dense_4bit, quantized_moe, inputs, max_new_tokens, pad)}


def agreement_row(reference, candidate, inputs: list[torch.Tensor], max_new_tokens: int, pad: int) -> dict:
    """`compare_models` of `candidate` against `reference`, rounded for the report."""
    report = compare_models(reference, candidate, inputs, max_new_tokens, pad)
    return {"max_abs_logit_difference": round(report["max_abs_logit_difference"], 4),
            "next_token_argmax_agreement": round(report["next_token_argmax_agreement"], 3),
            "identical_greedy_generations": f"{report['identical_generations']}/{report['inputs']}",
            "greedy_token_agreement": round(report["greedy_token_agreement"], 3)}
