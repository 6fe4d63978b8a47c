"""A short CPU GRPO run of an MoE model with and without routing replay (`MoeGRPOTrainer`, docs/rl.md):

    python scripts/grpo_routing_replay.py --model smollm2 --modes none,rollout \\
        --figure docs/images/grpo_routing_replay.png

Task (verifiable): "What is A + B? Answer with the number only." with A, B uniform in 0..`max_operand`; reward 1.0
when the completion's first integer is A + B, `number_credit` (default 0.1) when it holds another integer first, else
0. Each mode (`none` = plain GRPO, the rollout/training routing mismatch only measured; `rollout` = R3;
`first_step` = R2) starts from the same weights with the same seed, so the first rollout batch is the same.

Training: `MoeGRPOConfig` with `bf16=True` (on CPU: torch autocast to bfloat16 around the model's forward, so the
rollouts — `generate` with the KV cache — and the training forwards both run in bfloat16 over float32 weights),
`num_iterations=2` (each rollout batch is optimised twice: the second pass sees a policy that moved since the rollout,
which is where routing replay matters), `beta` > 0 (a reference model, KL logged), a constant learning rate, no
gradient checkpointing (TRL's default turns it on; off is faster on CPU and changes nothing else here). Defaults are
sized for a 2-core CPU: 4 completions per optimizer step (one prompt, a group of 4), rollout batches of 8 (2 prompts,
`steps_per_generation=2`) that each serve 4 optimizer steps (2 halves x 2 iterations), completions of at most 8
tokens. TRL logs the reward (and the other rollout metrics) at the steps that generate: every 4th step here.

Models: `smollm2` = the embedded SmolLM2-135M-Instruct upcycled by `hf_moe.upcycle` into `hf_moe` (4 experts top-2
by default, `expert_init="drop_upcycle"` so the experts differ, random routers) in a temporary folder (or
`--upcycled_dir`, reused when it exists, whatever options made it); `tiny` = the tests' tiny random hf_moe with the
byte tokenizer (smoke tests).

Writes `OUTPUT_DIR/grpo_routing_replay.json` (arguments, environment, per mode the per-step log history, the curves
and the summary), the figure (`--figure`, default `OUTPUT_DIR/grpo_routing_replay.png`: clipped-ratio fraction, KL,
reward, routing mismatch per step, one line per mode) and prints a markdown summary table.
"""

import dataclasses
import json
import math
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed

import hf_moe  # noqa: F401  (registers the Auto classes)

REPOSITORY = Path(__file__).resolve().parents[1]
MODES = ("none", "rollout", "first_step")
MODELS = ("smollm2", "tiny")
PROMPT = "What is {a} + {b}? Answer with the number only."
# (log key, panel title) of the figure, in order
PANELS = (("clip_ratio/region_mean", "clipped-ratio fraction (clip_ratio/region_mean)"), ("kl", "KL to the reference"),
          ("reward", "reward (mean over the rollout batch)"),
          ("moe/routing_mismatch", "routing mismatch (share of completion tokens)"))
CURVE_KEYS = ("loss", "reward", "reward_std", "kl", "entropy", "clip_ratio/region_mean", "clip_ratio/low_mean",
              "clip_ratio/high_mean", "moe/routing_mismatch", "moe/routing_mismatch_per_layer", "moe/replayed_tokens",
              "completions/mean_length", "frac_reward_zero_std", "aux_loss", "z_loss", "grad_norm", "step_time")


@dataclass
class GRPORunArguments:
    model: str = field(default="smollm2", metadata={"help": "smollm2 | tiny"})
    modes: str = field(default="none,rollout", metadata={
        "help": "comma-separated: none, rollout (R3), first_step (R2)"})
    max_steps: int = field(default=30, metadata={"help": "optimizer steps per mode"})
    output_dir: str = field(default="out/grpo_routing_replay")
    figure: str | None = field(default=None, metadata={"help": "PNG path; default OUTPUT_DIR/grpo_routing_replay.png"})
    seed: int = field(default=0, metadata={"help": "data, upcycling and training seed (the same for every mode)"})
    upcycled_dir: str | None = field(default=None, metadata={
        "help": "smollm2: folder of the upcycled model, reused when it exists (else upcycled there); empty = a "
                "temporary folder"})
    num_experts: int = field(default=4)
    top_k: int = field(default=2)
    drop_ratio: float = field(default=0.1, metadata={
        "help": "drop_upcycle: fraction of each expert's neurons re-drawn (0.5, the paper's default, leaves the "
                "135M model unable to answer at all)"})
    moe_layers: str = field(default="all", metadata={"help": "all | every_other | comma-separated layer indices"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "completions per optimizer step"})
    num_generations: int = field(default=4, metadata={"help": "completions per prompt (the GRPO group)"})
    max_completion_length: int = field(default=8, metadata={
        "help": "the answer is the first integer: longer completions only cost time"})
    num_iterations: int = field(default=2, metadata={"help": "optimisation passes over each rollout batch"})
    steps_per_generation: int = field(default=2, metadata={
        "help": "optimizer steps per rollout batch (TRL's): a rollout batch is per_device_train_batch_size x this; "
                "with num_iterations=2 each one serves 2 x this steps"})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient (> 0: KL is logged)"})
    learning_rate: float = field(default=5e-6)
    temperature: float = field(default=1.0)
    bf16: bool = field(default=True, metadata={"help": "CPU autocast to bfloat16 (rollouts and training forwards)"})
    max_operand: int = field(default=9, metadata={"help": "A and B are drawn from 0..max_operand"})
    number_credit: float = field(default=0.1, metadata={"help": "reward for a completion whose first integer is wrong"})
    system_prompt: str = field(default="Answer briefly.", metadata={
        "help": "system message of the chat prompt (short: the prompt is most of every sequence); empty = none "
                "(SmolLM2's template then adds its own)"})
    num_prompts: int = field(default=512)
    from_json: str | None = field(default=None, metadata={
        "help": "no training: write the JSON (into OUTPUT_DIR), the tables and the figure again from a finished "
                "run's JSON"})

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"`model`={self.model!r} is invalid: choose one of {MODELS}")
        self.mode_list = [mode.strip() for mode in self.modes.split(",") if mode.strip()]
        unknown = [mode for mode in self.mode_list if mode not in MODES]
        if unknown or not self.mode_list:
            raise ValueError(f"`modes`={self.modes!r} is invalid: a comma-separated subset of {MODES}")
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError("`per_device_train_batch_size` must be a multiple of `num_generations`")


# ---------------------------------------------------------------------------------------------------- task
def addition_dataset(args: GRPORunArguments):
    from datasets import Dataset

    rng = random.Random(args.seed)
    rows = {"prompt": [], "a": [], "b": []}
    for _ in range(args.num_prompts):
        a, b = rng.randint(0, args.max_operand), rng.randint(0, args.max_operand)
        messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        rows["prompt"].append([*messages, {"role": "user", "content": PROMPT.format(a=a, b=b)}])
        rows["a"].append(a)
        rows["b"].append(b)
    return Dataset.from_dict(rows)


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content") or "" for message in completion)  # conversational: assistant messages


def addition_reward(number_credit: float):
    def reward(completions, a, b, **kwargs):
        rewards = []
        for completion, x, y in zip(completions, a, b, strict=True):
            number = re.search(r"-?\d+", _text(completion))
            rewards.append(0.0 if number is None else 1.0 if int(number.group()) == x + y else number_credit)
        return rewards

    reward.__name__ = "addition"
    return reward


# ---------------------------------------------------------------------------------------------------- models
def upcycled_smollm2(args: GRPORunArguments, scratch: Path) -> tuple[Path, str]:
    from hf_moe import upcycle

    folder = Path(args.upcycled_dir) if args.upcycled_dir else scratch / "smollm2-moe"
    if not (folder / "config.json").is_file():
        upcycle(None, str(folder), arch="hf_moe", num_experts=args.num_experts, top_k=args.top_k,
                moe_layers=args.moe_layers, expert_init="drop_upcycle", drop_ratio=args.drop_ratio, seed=args.seed,
                overwrite=folder.exists())
    description = (f"SmolLM2-135M-Instruct (embedded GGUF) upcycled: hf_moe, {args.num_experts} experts top-"
                   f"{args.top_k}, sparse layers {args.moe_layers}, expert_init=drop_upcycle (drop_ratio "
                   f"{args.drop_ratio}), random routers (std 0.02), seed {args.seed}; float32 weights")
    return folder, description


def tiny_model(args: GRPORunArguments, scratch: Path) -> tuple[Path, str]:
    """The tests' tiny random hf_moe and byte tokenizer, saved (TRL builds the reference model from the folder)."""
    if str(REPOSITORY) not in sys.path:
        sys.path.insert(0, str(REPOSITORY))
    from tests.conftest import byte_tokenizer, tiny_config

    folder = scratch / "tiny-hf-moe"
    tokenizer = byte_tokenizer()
    set_seed(args.seed)
    config = tiny_config("hf_moe", vocab_size=len(tokenizer), num_hidden_layers=2, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, "tiny random hf_moe (tests/conftest.py: 2 layers, hidden 32, 4 experts top-2), byte tokenizer"


def load_model(folder: Path):
    """(model, tokenizer), freshly loaded: every mode starts from the same weights."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


class RolloutDtypeProbe:
    """The dtype of the first decoder layer's query projection in cached decode steps (one new token per row, no
    autograd): what the KV-cache rollout ran in."""

    def __init__(self, model):
        self.dtypes = set()
        linear = next(module for name, module in model.named_modules() if name.endswith("q_proj"))
        self.handle = linear.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if not torch.is_grad_enabled() and output.dim() == 3 and output.shape[1] == 1:
            self.dtypes.add(str(output.dtype).removeprefix("torch."))


# ---------------------------------------------------------------------------------------------------- one mode
def run_mode(args: GRPORunArguments, mode: str, folder: Path, dataset) -> dict:
    from hf_moe.training.grpo import MoeGRPOConfig, MoeGRPOTrainer

    set_seed(args.seed)
    model, tokenizer = load_model(folder)
    config = MoeGRPOConfig(
        output_dir=str(Path(args.output_dir) / mode), max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, num_iterations=args.num_iterations,
        steps_per_generation=args.steps_per_generation, beta=args.beta,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", temperature=args.temperature,
        bf16=args.bf16, use_cpu=True, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
        report_to=[], seed=args.seed, data_seed=args.seed, routing_replay=mode, disable_tqdm=True)
    trainer = MoeGRPOTrainer(model=model, reward_funcs=addition_reward(args.number_credit), args=config,
                             train_dataset=dataset, processing_class=tokenizer)
    probe = RolloutDtypeProbe(trainer.accelerator.unwrap_model(trainer.model))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    probe.handle.remove()
    history = [dict(entry) for entry in trainer.state.log_history]
    steps = [entry for entry in history if "loss" in entry and "step" in entry]
    curves = {key: [[entry["step"], entry[key]] for entry in steps if key in entry] for key in CURVE_KEYS}
    result = {"train_seconds": seconds, "seconds_per_step": seconds / max(trainer.state.global_step, 1),
              "steps": trainer.state.global_step, "rollout_decode_dtypes": sorted(probe.dtypes),
              "log_history": history, "curves": curves}
    result["summary"] = summarise(result, args)
    del trainer, model
    return result


def _mean(values) -> float:
    values = [value for value in values if value is not None and not math.isnan(value)]
    return sum(values) / len(values) if values else float("nan")


def summarise(result: dict, args: GRPORunArguments) -> dict:
    curves, window = result["curves"], min(10, max(1, math.ceil(args.max_steps / 2)))
    steps = result["steps"]
    rewards = curves["reward"]
    # Optimizer steps taken since the step's rollout batch was generated (and TRL's old log-probs computed on it).
    cycle = args.steps_per_generation * args.num_iterations
    clip_by_age = {age: _mean(value for step, value in curves["clip_ratio/region_mean"] if (step - 1) % cycle == age)
                   for age in range(cycle)}
    return {
        "clip_ratio_region_by_steps_since_rollout": clip_by_age,
        "window": window,
        "clip_ratio_region": _mean(value for _, value in curves["clip_ratio/region_mean"]),
        "kl": _mean(value for _, value in curves["kl"]),
        "reward_first": _mean(value for step, value in rewards if step <= window),
        "reward_last": _mean(value for step, value in rewards if step > steps - window),
        "routing_mismatch": _mean(value for _, value in curves["moe/routing_mismatch"]),
        "routing_mismatch_per_layer": _mean(value for _, value in curves["moe/routing_mismatch_per_layer"]),
        "replayed_tokens": _mean(value for _, value in curves["moe/replayed_tokens"]),
        "seconds_per_step": result["seconds_per_step"],
    }


# ---------------------------------------------------------------------------------------------------- report
def markdown_table(results: dict) -> str:
    window = next(iter(results.values()))["summary"]["window"]
    steps = next(iter(results.values()))["steps"]
    lines = [f"| mode | steps | clipped-ratio fraction (mean) | KL (mean) | reward, steps 1-{window} | reward, steps "
             f"{steps - window + 1}-{steps} | routing mismatch (mean) | mismatch per layer (mean) | replayed share "
             "(mean) | s / step |", "|---|---|---|---|---|---|---|---|---|---|"]

    def number(value, digits=4):
        return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    for mode, result in results.items():
        summary = result["summary"]
        lines.append(f"| {mode} | {result['steps']} | {number(summary['clip_ratio_region'])} | "
                     f"{number(summary['kl'], 5)} | {number(summary['reward_first'], 3)} | "
                     f"{number(summary['reward_last'], 3)} | {number(summary['routing_mismatch'])} | "
                     f"{number(summary['routing_mismatch_per_layer'])} | {number(summary['replayed_tokens'])} | "
                     f"{summary['seconds_per_step']:.1f} |")
    return "\n".join(lines)


def age_table(results: dict) -> str:
    """The clipped-ratio fraction by optimizer steps taken since the rollout batch was generated."""
    ages = list(next(iter(results.values()))["summary"]["clip_ratio_region_by_steps_since_rollout"])
    lines = ["| mode | " + " | ".join(f"clipped fraction, {age} step{'s' * (age != 1)} after the rollout"
                                      for age in ages) + " |", "|---|" + "---|" * len(ages)]
    for mode, result in results.items():
        by_age = result["summary"]["clip_ratio_region_by_steps_since_rollout"]
        lines.append(f"| {mode} | " + " | ".join(f"{by_age[age]:.4f}" for age in ages) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for axis, (key, panel_title) in zip(axes.flat, PANELS, strict=True):
        for mode, result in results.items():
            points = result["curves"].get(key, [])
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, marker="o", markersize=3, linewidth=1.3, label=mode)
        axis.set_title(panel_title, fontsize=10)
        axis.grid(alpha=0.3)
    for axis in axes[1]:
        axis.set_xlabel("optimizer step")
    axes.flat[0].legend(title="routing_replay", fontsize=9)
    figure.suptitle(title, fontsize=9.5)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def environment() -> dict:
    import trl

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        cpu = platform.processor()
    return {"cpu": cpu, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "hf_moe": getattr(hf_moe, "__version__", "unknown")}


def main(args: GRPORunArguments) -> dict:
    transformers.utils.logging.disable_progress_bar()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "grpo_routing_replay.json"
    if args.from_json:  # report again from a finished run: its arguments, curves and environment
        report = json.loads(Path(args.from_json).read_text())
        run_args = GRPORunArguments(**{key: value for key, value in report["arguments"].items()
                                       if key not in ("from_json", "figure", "output_dir")})
        results, description = report["modes"], report["model"]
        for result in results.values():
            result["curves"] = {key: [[int(step), value] for step, value in points]
                                for key, points in result["curves"].items()}
            result["summary"] = summarise(result, run_args)
    else:
        run_args = args
        dataset = addition_dataset(args)
        with tempfile.TemporaryDirectory(prefix="grpo-routing-replay-") as scratch:
            folder, description = (upcycled_smollm2 if args.model == "smollm2" else tiny_model)(args, Path(scratch))
            results = {}
            for mode in args.mode_list:
                print(f"--- routing_replay={mode}", flush=True)
                results[mode] = run_mode(args, mode, folder, dataset)
                print(f"{mode}: {results[mode]['steps']} steps in {results[mode]['train_seconds']:.0f} s", flush=True)
        report = {"arguments": dataclasses.asdict(args), "model": description, "environment": environment(),
                  "modes": results}
    report["table"], report["age_table"] = markdown_table(results), age_table(results)
    json_path.write_text(json.dumps(report, indent=1, default=str))
    figure = Path(args.figure) if args.figure else output_dir / "grpo_routing_replay.png"
    smollm2 = run_args.model == "smollm2"
    plot(results, figure, f"GRPO on {'SmolLM2-135M-Instruct upcycled' if smollm2 else 'tiny hf_moe'} "
                          f"({run_args.num_experts if smollm2 else 4} experts top-2), "
                          f"{run_args.per_device_train_batch_size} completions/step, rollout batch "
                          f"{run_args.per_device_train_batch_size * run_args.steps_per_generation}, "
                          f"num_iterations={run_args.num_iterations},\nbeta={run_args.beta}, "
                          f"lr={run_args.learning_rate:g}, bf16 autocast (CPU), seed {run_args.seed}")
    print(f"model: {description}")
    print(report["table"])
    print()
    print(report["age_table"])
    print(f"wrote {json_path} and {figure}")
    return report


if __name__ == "__main__":
    main(HfArgumentParser(GRPORunArguments).parse_args_into_dataclasses()[0])
