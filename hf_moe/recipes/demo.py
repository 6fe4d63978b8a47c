"""The core demo: build each architecture, save it, reload the folder as remote code without hf_moe, generate."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..checkpoints.atomic import atomic_output_dir
from ..checkpoints.compare import compare_outputs
from ..checkpoints.names import HF_MOE_MODEL_TYPES
from ..remote_check import load_as_remote_code

DEMO_DECODER = dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, num_experts=8, pad_token_id=0)


@dataclass
class DemoArguments:
    output_dir: str = field(default="out/demo", metadata={"help": "one sub-folder per architecture is written here"})
    model_types: str = field(default=",".join(HF_MOE_MODEL_TYPES), metadata={"help": "comma-separated"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing demo folders"})
    seed: int = 0

    def __post_init__(self):
        parse_model_types(self.model_types)  # at parsing: one short line, before anything is built


def parse_model_types(model_types: str) -> tuple[str, ...]:
    """'hf_moe,hf_switch' -> ('hf_moe', 'hf_switch'), checked against the hf_moe model types (transformers' own
    error for an unknown one lists every model type it knows, hundreds of them)."""
    names = tuple(name for name in (part.strip() for part in model_types.split(",")) if name)
    if not names or any(name not in HF_MOE_MODEL_TYPES for name in names):
        raise ValueError(f"`model_types`={model_types!r} is invalid: give a comma-separated subset of "
                         f"{HF_MOE_MODEL_TYPES}")
    return names


def run_demo(args: DemoArguments) -> list[dict]:
    """For each model type: random model -> save_pretrained -> remote-code load in a process without hf_moe.

    Returns one dict per model type with the max |logit difference| and whether greedy generations agree.
    """
    torch.manual_seed(args.seed)
    results = []
    for model_type in parse_model_types(args.model_types):
        config = AutoConfig.for_model(model_type, **DEMO_DECODER)
        model = AutoModelForCausalLM.from_config(config).eval()
        folder = Path(args.output_dir) / model_type
        with atomic_output_dir(folder, overwrite=args.overwrite) as staging:
            model.save_pretrained(staging)
        input_ids = torch.randint(3, config.vocab_size, (2, 12))
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
        generated = model.generate(input_ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        remote = load_as_remote_code(folder, input_ids, max_new_tokens=10)
        comparison = compare_outputs({"logits": [logits], "generations": [generated.tolist()]},
                                     {"logits": [remote["logits"]], "generations": [remote["generated"].tolist()]})
        results.append(dict(
            model_type=model_type,
            folder=str(folder),
            parameters=sum(p.numel() for p in model.parameters()),
            remote_class=remote["classes"][0],
            max_abs_logit_difference=comparison["max_abs_logit_difference"],
            generations_identical=comparison["identical_generations"] == 1,
            generated_ids=generated[0, -10:].tolist(),
        ))
    return results
