"""Check exported folders the way their users load them: stock `AutoModelForCausalLM.from_pretrained(folder)` in a
fresh process in which hf_moe cannot be imported (no `trust_remote_code`), side by side with the hf_moe model."""

import json
import tempfile
import textwrap
from pathlib import Path

import torch

from ..checkpoints.compare import SAMPLE_PROMPTS, chat_prompt_ids, compare_outputs, model_outputs, pad_token_id
from ..checkpoints.reading import open_model_folder
from ..remote_check import run_without_hf_moe

_NATIVE_LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors import safe_open
    from pathlib import Path
    from transformers import AutoModelForCausalLM
    jobs, result_path = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2]
    results = []
    for job in jobs:
        model, info = AutoModelForCausalLM.from_pretrained(job["folder"], dtype=torch.float32,
                                                           output_loading_info=True)
        model.eval()
        names = []
        for file in sorted(Path(job["folder"]).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                names += list(handle.keys())
        logits, generations = [], []
        for ids in job["inputs"]:
            ids = torch.tensor([ids])
            with torch.no_grad():
                logits.append(model(input_ids=ids).logits)
            generated = model.generate(ids, max_new_tokens=job["max_new_tokens"], do_sample=False,
                                       pad_token_id=job["pad_token_id"])
            generations.append(generated[0, ids.shape[1]:].tolist())
        results.append({
            "class": type(model).__name__, "module": type(model).__module__,
            "loading_info": {key: sorted(value) for key, value in info.items() if key != "error_msgs"},
            "tensor_names": sorted(names), "logits": logits, "generations": generations,
            "hf_moe_imported": any(name.startswith("hf_moe.") for name in sys.modules),
        })
    torch.save(results, result_path)
    """
)


def load_natively(jobs: list[dict]) -> list[dict]:
    """Load several exported folders in ONE fresh process without hf_moe (stock transformers, float32).

    Each job is `{"folder", "inputs": [list of token ids], "max_new_tokens", "pad_token_id"}`; each result holds the
    class loaded, the loading info (missing / unexpected / mismatched keys), the tensor names on disk, the logits
    and the greedy continuations of every input.
    """
    jobs = [dict(job, folder=str(Path(job["folder"]).resolve())) for job in jobs]
    with tempfile.TemporaryDirectory() as scratch:  # a file: token lists can exceed the command-line limit
        jobs_path = Path(scratch) / "jobs.json"
        jobs_path.write_text(json.dumps(jobs))
        return run_without_hf_moe(_NATIVE_LOADER, str(jobs_path), description="loading the exported folders natively")


def verify_export(hf_moe_folder: str | Path, exported_folder: str | Path, prompts=SAMPLE_PROMPTS,
                  max_new_tokens: int = 24) -> dict:
    """The hf_moe folder in this process against the export loaded natively in a process without hf_moe, on
    `prompts` (chat-formatted with the folder's tokenizer): max |Δlogit|, identical greedy answers, loading info."""
    source = open_model_folder(hf_moe_folder)
    tokenizer = source.load_tokenizer()
    inputs = [chat_prompt_ids(tokenizer, prompt) for prompt in prompts]
    pad = pad_token_id(tokenizer)
    model = source.load_model(torch.float32)
    reference = model_outputs(model, inputs, max_new_tokens, pad)
    (exported,) = load_natively([dict(folder=exported_folder, inputs=[ids[0].tolist() for ids in inputs],
                                      max_new_tokens=max_new_tokens, pad_token_id=pad)])
    report = compare_outputs(reference, exported)
    report.update(loaded_class=exported["class"], loading_info=exported["loading_info"],
                  hf_moe_imported=exported["hf_moe_imported"])
    report["samples"] = [dict(prompt=prompt, hf_moe=tokenizer.decode(a, skip_special_tokens=True),
                              exported=tokenizer.decode(b, skip_special_tokens=True), max_abs_logit_difference=d,
                              identical=same)
                         for prompt, a, b, d, same in zip(prompts, report.pop("reference_generations"),
                                                          report.pop("candidate_generations"),
                                                          report["per_input_difference"],
                                                          report["per_input_identical"], strict=True)]
    return report
