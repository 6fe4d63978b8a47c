"""Run under `accelerate launch` with a ZeRO-3 config: `hf-moe finetune` (same arguments), then write what ZeRO-3 did
to the sparse blocks into `<output_dir>/zero3_report-<rank>.json` (for tests/test_accelerate.py)."""

import json
import sys
from pathlib import Path

from deepspeed.utils import get_z3_leaf_modules

from hf_moe.cli import parse_command
from hf_moe.quantization.experts import expert_parameters
from hf_moe.recipes import build_trainer

_, (args, training_args) = parse_command(["finetune", *sys.argv[1:]])
trainer = build_trainer(args, training_args)
trainer.train()
model = trainer.model
report = {
    "leaf_modules": sorted({type(module).__name__ for module in get_z3_leaf_modules(model)}),
    # Each rank holds its shard of every expert tensor (ds_tensor) of the full tensor's ds_numel elements.
    "expert_shards": {name: [getattr(module, parameter).ds_tensor.numel(), getattr(module, parameter).ds_numel]
                      for name, module, parameter in expert_parameters(model)},
}
Path(training_args.output_dir, f"zero3_report-{trainer.args.process_index}.json").write_text(json.dumps(report))
