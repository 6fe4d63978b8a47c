"""How much routing replay (R3, arXiv 2510.11370) removes of the rollout / training mismatch of an MoE model, and
what it costs: `python scripts/measure_routing_replay.py --model all --output_json out/replay.json`.

Per model:

1. Rollout: a bfloat16 copy of the model `generate`s from a left-padded batch of prompts (KV cache, sampled with a
   fixed seed, or greedy with `--do_sample false`) inside `record_routing`; the log-probabilities of the generated
   tokens come from its `output_logits` (temperature 1, before any logits processor).
2. Training forward: the float32 model runs one full forward (no cache) over the final sequences, with the
   rollout's attention mask (zeros after each completion's first EOS) and its position ids (counted from the first
   real token, as `generate` counts them). Its routing is recorded without replay, then with
   `replay_routing(model, rollout_trace)`, and compared with the rollout's over the completion tokens: share of
   tokens with at least one sparse layer routed to another expert set, mean and max per-layer share, max and mean
   |delta log p| of the generated tokens. To separate the causes, the float32 model also makes its own rollout
   (cache vs no cache alone, same dtype), and the bfloat16 model its own training forward (cache alone in bf16).
3. Speed: the float32 model's forward (with autograd recording) and forward + backward of the rollout batch, with
   `replay_routing` around it vs without, interleaved rounds after a warm-up (gradient buffers kept between rounds);
   the medians of the per-round ratios, in wall time and in process CPU time (`--speed_threads 1` makes the CPU
   time little sensitive to other processes on the machine).

`--parts mismatch` or `--parts speed` runs one half (a speed-only run makes only the bf16 rollout, for its batch and
trace).

Models: `smollm2` = the embedded SmolLM2-135M-Instruct upcycled by `hf_moe.upcycle` (drop-upcycled experts, so
experts differ and routing matters; drop ratio 0.1 by default, which keeps the untrained model's answers sensible),
chat-formatted instruction prompts; `deepseek_v3` = a tiny random transformers DeepSeek-V3 (8 experts, top-2,
2 groups with 1 kept, random routers and a non-zero `e_score_correction_bias`), random token prompts;
`hf_moe_tiny` = a tiny random hf_moe model (for smoke tests). All models run in eval mode (no dropout, no router
jitter; upcycled models are dropless). Results and commands: docs/rl.md.
"""

import copy
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, HfArgumentParser

import hf_moe  # noqa: F401  (registers the Auto classes)
from hf_moe.moe_layers import find_moe_layers
from hf_moe.routing import record_routing, replay_routing, routing_mismatch

MODELS = ("smollm2", "deepseek_v3", "hf_moe_tiny")
SMOLLM2_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Explain in one sentence why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "What is 12 times 7?",
    "Give me two tips for sleeping better.",
    "Translate 'good morning' into Spanish.",
    "What does a compiler do?",
    "List three fruits that are red.",
    "Summarise the plot of Cinderella in two sentences.",
    "Why do cats purr?",
    "Suggest a name for a small bakery.",
    "How many legs does a spider have?",
    "What is photosynthesis?",
    "Write a short greeting for a birthday card.",
    "What is the boiling point of water at sea level?",
)


@dataclass
class ReplayMeasurementArguments:
    model: str = field(default="all", metadata={"help": "smollm2 | deepseek_v3 | hf_moe_tiny | all (= smollm2 and "
                                                        "deepseek_v3)"})
    num_prompts: int = field(default=8, metadata={"help": "prompts in the rollout batch"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per prompt"})
    repeats: int = field(default=5, metadata={"help": "timed rounds per variant (after one warm-up round)"})
    do_sample: bool = field(default=True, metadata={"help": "sample (temperature 1, no top-k/top-p) or greedy"})
    seed: int = field(default=0, metadata={"help": "seed of the sampling and of the random models"})
    num_experts: int = field(default=4, metadata={"help": "smollm2: experts per sparse layer"})
    top_k: int = field(default=2, metadata={"help": "smollm2: experts per token"})
    drop_ratio: float = field(default=0.1, metadata={
        "help": "smollm2: drop_upcycle's share of re-drawn neurons (0.1 keeps the untrained model answering "
                "sensibly; upcycle's default 0.5 makes it emit gibberish)"})
    upcycled_dir: str | None = field(default=None, metadata={
        "help": "smollm2: folder of the upcycled model, reused when it exists (it must have been upcycled with the "
                "same options; else it is upcycled there); empty = a temporary folder"})
    speed_threads: int | None = field(default=None, metadata={
        "help": "intra-op threads for the speed part (empty = torch's default); with 1 the CPU-time ratio is "
                "little affected by other processes on the machine"})
    parts: str = field(default="mismatch,speed", metadata={
        "help": "what to measure: mismatch (routing and log-probs), speed (replay overhead), or both (a speed-only "
                "run makes the bf16 rollout only, for its batch and trace)"})
    output_json: str | None = field(default=None, metadata={"help": "write the results as JSON here"})

    def __post_init__(self):
        if self.model not in (*MODELS, "all"):
            raise ValueError(f"`model`={self.model!r} is invalid: choose one of {(*MODELS, 'all')}")
        unknown = set(self.part_names) - {"mismatch", "speed"}
        if unknown or not self.part_names:
            raise ValueError(f"`parts`={self.parts!r} is invalid: comma-separated mismatch, speed")
        if min(self.num_prompts, self.max_new_tokens, self.repeats) < 1:
            raise ValueError("`num_prompts`, `max_new_tokens` and `repeats` must be positive")

    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.parts.split(",") if part.strip())


_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------- models
def _smollm2(args: ReplayMeasurementArguments, scratch: Path):
    """(float32 model, prompt batch, description): the embedded SmolLM2-135M-Instruct, drop-upcycled."""
    from transformers import AutoTokenizer

    from hf_moe import upcycle

    folder = Path(args.upcycled_dir) if args.upcycled_dir else scratch / "smollm2-moe"
    if not (folder / "config.json").exists():
        upcycle(None, str(folder), arch="hf_moe", num_experts=args.num_experts, top_k=args.top_k,
                expert_init="drop_upcycle", drop_ratio=args.drop_ratio, seed=args.seed, overwrite=folder.exists())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    prompts = [SMOLLM2_PROMPTS[index % len(SMOLLM2_PROMPTS)] for index in range(args.num_prompts)]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False) for prompt in prompts]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    description = (f"SmolLM2-135M-Instruct (embedded GGUF) upcycled: hf_moe, {args.num_experts} experts top-"
                   f"{args.top_k}, expert_init=drop_upcycle (drop_ratio {args.drop_ratio}), random routers (std 0.02), "
                   f"seed {args.seed}; "
                   f"chat-formatted instruction prompts")
    return model, batch, description


def _random_prompts(args, vocab_size: int, pad_token_id: int, low: int = 3):
    """A left-padded batch of random token prompts of lengths 4..15."""
    generator = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(4, 16, (args.num_prompts,), generator=generator).tolist()
    width = max(lengths)
    input_ids = torch.full((args.num_prompts, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(args.num_prompts, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length:] = torch.randint(low, vocab_size, (length,), generator=generator)
        attention_mask[row, width - length:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _randomise_routers(model, seed: int):
    """Random router weights (some families initialise them to zeros) and a non-zero selection bias."""
    generator = torch.Generator().manual_seed(seed + 2)
    for layer in find_moe_layers(model):
        with torch.no_grad():
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=generator))
            bias = getattr(layer.router, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)


def _deepseek_v3(args: ReplayMeasurementArguments, scratch: Path):
    config = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=0,
        moe_intermediate_size=24, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_routers(model, args.seed)
    description = ("tiny random transformers DeepSeek-V3: 2 layers (both sparse), hidden 32, 8 routed experts top-2, "
                   "n_group=2 topk_group=1, 1 shared expert, router weights N(0, 1), e_score_correction_bias "
                   "N(0, 0.1^2); random token prompts (lengths 4..15, left-padded)")
    return model, _random_prompts(args, config.vocab_size, config.pad_token_id), description


def _hf_moe_tiny(args: ReplayMeasurementArguments, scratch: Path):
    from hf_moe import MoeConfig

    config = MoeConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_routers(model, args.seed)
    description = "tiny random hf_moe: 3 layers, hidden 32, 4 experts top-2, router weights N(0, 1); random prompts"
    return model, _random_prompts(args, config.vocab_size, config.pad_token_id), description


BUILDERS = {"smollm2": _smollm2, "deepseek_v3": _deepseek_v3, "hf_moe_tiny": _hf_moe_tiny}


# ---------------------------------------------------------------------------------------------------- measurements
def _positions(mask: torch.Tensor) -> torch.Tensor:
    """`generate`'s position ids of a left-padded batch: counted from each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def _pad_id(model) -> int:
    pad = model.generation_config.pad_token_id
    return model.config.pad_token_id if pad is None else pad


def rollout(model, batch, args) -> dict:
    """Generate (recording the routing); the final sequences, masks and the generated tokens' log-probs."""
    torch.manual_seed(args.seed)
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if args.do_sample else dict(do_sample=False)
    start = time.perf_counter()
    with torch.no_grad(), record_routing(model) as recorder:
        output = model.generate(**batch, max_new_tokens=args.max_new_tokens, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=_pad_id(model), **sampling)
    seconds = time.perf_counter() - start
    sequences = output.sequences
    prompt_length = batch["input_ids"].shape[1]
    generated = sequences[:, prompt_length:]
    steps = generated.shape[1]
    is_eos = torch.zeros_like(generated, dtype=torch.bool)
    for eos in _eos_ids(model):
        is_eos |= generated == eos
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    completion = ~after_eos  # the generated tokens up to and including the first EOS
    logits = torch.stack(output.logits[:steps], dim=1).float()  # (batch, steps, vocab)
    logp = logits.log_softmax(-1).gather(-1, generated[..., None]).squeeze(-1)
    attention_mask = torch.cat([batch["attention_mask"].bool(), completion], dim=1)
    return {"sequences": sequences, "attention_mask": attention_mask, "prompt_length": prompt_length,
            "completion": completion, "logp": logp, "trace": recorder.trace, "seconds": seconds}


def training_forward(model, roll: dict, trace=None) -> dict:
    """One full forward of the rollout's sequences (no cache), recorded; replaying `trace` when given."""
    sequences, mask = roll["sequences"], roll["attention_mask"]
    inputs = dict(input_ids=sequences, attention_mask=mask.long(), position_ids=_positions(mask), use_cache=False)
    with torch.no_grad():
        if trace is None:
            with record_routing(model) as recorder:
                logits = model(**inputs).logits
            replayed_share = None
        else:
            # The recorder is attached after the replay: it sees the experts the replay handed to the experts.
            with replay_routing(model, trace.resized(sequences.shape[1])) as replay, \
                    record_routing(model) as recorder:
                logits = model(**inputs).logits
            replayed_share = replay.replayed_share
    prompt_length = roll["prompt_length"]
    generated = sequences[:, prompt_length:]
    predicting = logits[:, prompt_length - 1:-1].float()  # the logits that predicted each generated token
    logp = predicting.log_softmax(-1).gather(-1, generated[..., None]).squeeze(-1)
    return {"trace": recorder.trace, "logp": logp, "replayed_share": replayed_share}


def _masked(trace, mask: torch.Tensor):
    """The trace over the final length, comparing only the positions of `mask`."""
    trace = trace.resized(mask.shape[1])
    return dataclasses.replace(trace, attention_mask=mask.to(trace.attention_mask.device))


def compare(roll: dict, train: dict) -> dict:
    """Routing and log-prob differences between a rollout and a training forward of its sequences."""
    completion = roll["completion"]
    length = roll["sequences"].shape[1]
    completion_positions = torch.zeros(completion.shape[0], length, dtype=torch.bool)
    completion_positions[:, roll["prompt_length"]:] = completion
    prompt_positions = roll["attention_mask"].clone()
    prompt_positions[:, roll["prompt_length"]:] = False
    on_completion = routing_mismatch(_masked(roll["trace"], completion_positions),
                                     _masked(train["trace"], completion_positions))
    on_prompt = routing_mismatch(_masked(roll["trace"], prompt_positions), _masked(train["trace"], prompt_positions))
    delta = (roll["logp"] - train["logp"]).abs()[completion]
    result = {
        "completion_tokens_compared": on_completion.tokens,
        "differing_token_share": on_completion.token_share,
        "mean_layer_share": on_completion.mean_layer_share,
        "max_layer_share": max(on_completion.layer_share),
        "layer_share": list(on_completion.layer_share),
        "prompt_tokens_compared": on_prompt.tokens,
        "prompt_differing_token_share": on_prompt.token_share,
        "logp_tokens": int(delta.numel()),
        "max_abs_logp_diff": float(delta.max()),
        "mean_abs_logp_diff": float(delta.mean()),
    }
    if train["replayed_share"] is not None:
        result["replayed_share"] = train["replayed_share"]
    return result


def measure_speed(model, roll: dict, repeats: int) -> dict:
    """Forward (autograd on) and forward + backward of the rollout batch, with and without replay."""
    sequences, mask = roll["sequences"], roll["attention_mask"]
    trace = roll["trace"].resized(sequences.shape[1])
    labels = sequences.masked_fill(~mask, -100)
    labels[:, :roll["prompt_length"]] = -100
    inputs = dict(input_ids=sequences, attention_mask=mask.long(), position_ids=_positions(mask), use_cache=False,
                  labels=labels)

    def step(replay: bool, backward: bool):
        def run():
            model.zero_grad(set_to_none=False)  # keeps the gradient buffers: no fresh allocation in each round
            if replay:
                with replay_routing(model, trace):
                    loss = model(**inputs).loss
                    if backward:
                        loss.backward()
            else:
                loss = model(**inputs).loss
                if backward:
                    loss.backward()
        return run

    result = {"batch": list(sequences.shape), "repeats": repeats}
    for name, backward in (("forward", False), ("forward_backward", True)):
        candidates = {"without_replay": step(False, backward), "with_replay": step(True, backward)}
        for run in candidates.values():  # warm-up
            run()
        wall, cpu = {key: [] for key in candidates}, {key: [] for key in candidates}
        names = list(candidates)
        for round_index in range(repeats):
            shift = round_index % 2  # alternate which runs first
            for key in names[shift:] + names[:shift]:
                start, start_cpu = time.perf_counter(), time.process_time()
                candidates[key]()
                wall[key].append(time.perf_counter() - start)
                cpu[key].append(time.process_time() - start_cpu)
        row = {}
        for unit, seconds in (("s", wall), ("cpu_s", cpu)):
            ratios = [with_ / without for with_, without in zip(seconds["with_replay"], seconds["without_replay"],
                                                                strict=True)]
            prefix = "" if unit == "s" else "cpu_"
            row.update({f"without_replay_{unit}": statistics.median(seconds["without_replay"]),
                        f"with_replay_{unit}": statistics.median(seconds["with_replay"]),
                        f"{prefix}ratio": statistics.median(ratios), f"{prefix}ratios": ratios})
        result[name] = row
    model.zero_grad(set_to_none=True)
    return result


COMPARISONS = (
    ("bf16_rollout_vs_fp32_training", "bf16 rollout -> fp32 training, no replay"),
    ("bf16_rollout_vs_fp32_training_replayed", "bf16 rollout -> fp32 training, replay"),
    ("fp32_rollout_vs_fp32_training", "fp32 rollout -> fp32 training, no replay (cache only)"),
    ("fp32_rollout_vs_fp32_training_replayed", "fp32 rollout -> fp32 training, replay"),
    ("bf16_rollout_vs_bf16_training", "bf16 rollout -> bf16 training, no replay (cache only, bf16)"),
)


def measure_model(name: str, args: ReplayMeasurementArguments, scratch: Path) -> dict:
    started = time.perf_counter()
    log(f"{name}: building the model")
    model, batch, description = BUILDERS[name](args, scratch)
    model.eval()
    model.requires_grad_(True)
    layers = find_moe_layers(model)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()

    log(f"{name}: bf16 rollout")
    bf16_roll = rollout(model_bf16, batch, args)
    result = {
        "description": description,
        "model_type": model.config.model_type,
        "sparse_layers": len(layers),
        "num_experts": layers[0].num_experts,
        "top_k": layers[0].top_k,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "prompts": batch["input_ids"].shape[0],
        "prompt_width": batch["input_ids"].shape[1],
        "max_new_tokens": args.max_new_tokens,
        "rollout_trace_length": bf16_roll["trace"].length,
        "sequence_length": bf16_roll["sequences"].shape[1],
        "completion_tokens": {"bf16": int(bf16_roll["completion"].sum())},
        "rollout_seconds": {"bf16": bf16_roll["seconds"]},
    }
    if "mismatch" in args.part_names:
        log(f"{name}: fp32 rollout")
        fp32_roll = rollout(model, batch, args)
        result["completion_tokens"]["fp32"] = int(fp32_roll["completion"].sum())
        result["rollout_seconds"]["fp32"] = fp32_roll["seconds"]
        log(f"{name}: training forwards")
        result["comparisons"] = {
            "bf16_rollout_vs_fp32_training": compare(bf16_roll, training_forward(model, bf16_roll)),
            "bf16_rollout_vs_fp32_training_replayed": compare(bf16_roll, training_forward(model, bf16_roll,
                                                                                          bf16_roll["trace"])),
            "fp32_rollout_vs_fp32_training": compare(fp32_roll, training_forward(model, fp32_roll)),
            "fp32_rollout_vs_fp32_training_replayed": compare(fp32_roll, training_forward(model, fp32_roll,
                                                                                          fp32_roll["trace"])),
            "bf16_rollout_vs_bf16_training": compare(bf16_roll, training_forward(model_bf16, bf16_roll)),
        }
    del model_bf16
    if "speed" in args.part_names:
        log(f"{name}: speed")
        threads = torch.get_num_threads()
        if args.speed_threads:
            torch.set_num_threads(args.speed_threads)
        try:
            result["speed"] = measure_speed(model, bf16_roll, args.repeats)
            result["speed"]["threads"] = torch.get_num_threads()
        finally:
            torch.set_num_threads(threads)
    result["seconds"] = time.perf_counter() - started
    log(f"{name}: done")
    return result


# ----------------------------------------------------------------------------------------------------------- report
def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def markdown(name: str, result: dict) -> str:
    lines = [f"### {name}", "", result["description"], ""]
    if "comparisons" in result:
        comparisons = result["comparisons"]
        lines += [f"{result['prompts']} prompts, {result['max_new_tokens']} new tokens; completion tokens compared "
                  f"(up to the first EOS; the last generated token has no routing): bf16 rollout "
                  f"{comparisons['bf16_rollout_vs_fp32_training']['completion_tokens_compared']}, fp32 rollout "
                  f"{comparisons['fp32_rollout_vs_fp32_training']['completion_tokens_compared']}; the rollouts took "
                  f"{result['rollout_seconds']['bf16']:.1f} s (bf16) and {result['rollout_seconds']['fp32']:.1f} s "
                  f"(fp32).", "",
                  "| rollout -> training forward | tokens with >=1 differing layer | mean layer share | max layer "
                  "share | prompt tokens differing | max abs dlogp | mean abs dlogp |",
                  "|---|---|---|---|---|---|---|"]
        for key, label in COMPARISONS:
            row = comparisons[key]
            lines.append(f"| {label} | {row['differing_token_share']:.2%} | {row['mean_layer_share']:.2%} | "
                         f"{row['max_layer_share']:.2%} | {row['prompt_differing_token_share']:.2%} | "
                         f"{row['max_abs_logp_diff']:.3g} | {row['mean_abs_logp_diff']:.3g} |")
        lines.append("")
    if "speed" in result:
        speed = result["speed"]
        lines += [f"fp32 model, batch {speed['batch'][0]} x {speed['batch'][1]} tokens, {speed['threads']} "
                  f"intra-op thread(s), medians of {speed['repeats']} interleaved rounds after a warm-up (ratio: "
                  f"median of the per-round ratios with / without replay, and their range):", "",
                  "| timed | wall without (s) | wall with (s) | wall ratio | range | CPU without (s) | CPU with (s) "
                  "| CPU ratio | range |", "|---|---|---|---|---|---|---|---|---|"]
        for key, label in (("forward", "forward (autograd on)"), ("forward_backward", "forward + backward")):
            row = speed[key]
            lines.append(f"| {label} | {row['without_replay_s']:.4g} | {row['with_replay_s']:.4g} | "
                         f"{row['ratio']:.3f}x | {min(row['ratios']):.3f}-{max(row['ratios']):.3f} | "
                         f"{row['without_replay_cpu_s']:.4g} | {row['with_replay_cpu_s']:.4g} | "
                         f"{row['cpu_ratio']:.3f}x | {min(row['cpu_ratios']):.3f}-{max(row['cpu_ratios']):.3f} |")
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(ReplayMeasurementArguments).parse_args_into_dataclasses(args=argv)
    names = ["smollm2", "deepseek_v3"] if args.model == "all" else [args.model]
    results = {"environment": environment(), "arguments": dataclasses.asdict(args), "models": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            results["models"][name] = measure_model(name, args, Path(scratch))
            print(markdown(name, results["models"][name]) + "\n", flush=True)
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
