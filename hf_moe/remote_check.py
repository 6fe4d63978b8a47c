"""Check that a saved model folder works as Hub remote code: load it in a fresh Python process in which hf_moe
cannot be imported, exactly as a user without hf_moe would with `trust_remote_code=True`."""

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

# Prepended to every script: any `import hf_moe` in the fresh process raises ImportError.
_BLOCK_HF_MOE = "import sys\nsys.modules['hf_moe'] = None\n"

_REMOTE_LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    folder, ids, result_path = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), sys.argv[4]
    max_new_tokens = int(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    generated = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    torch.save({
        "logits": logits,
        "generated": generated,
        "classes": [type(model).__name__, type(base).__name__, type(classifier).__name__],
        "modules": [type(model).__module__, type(base).__module__, type(classifier).__module__],
        "experts_implementation": model.config._experts_implementation,
    }, result_path)
    """
)


def load_as_remote_code(folder: str | Path, input_ids: torch.Tensor, max_new_tokens: int = 8) -> dict:
    """Load `folder` with the three Auto classes and `trust_remote_code=True` in a subprocess without hf_moe.

    Returns the causal LM's logits on `input_ids`, its greedy generation, and the class names and modules loaded.
    Raises `RuntimeError` with the subprocess's error output if loading fails.

    Example:
    ```python
    >>> result = load_as_remote_code("out/my-moe", torch.tensor([[1, 2, 3]]))
    >>> result["classes"]
    ['MoeForCausalLM', 'MoeModel', 'MoeForSequenceClassification']
    ```
    """
    return run_without_hf_moe(_REMOTE_LOADER, str(Path(folder).resolve()), json.dumps(input_ids.tolist()),
                              str(max_new_tokens), description=f"loading {folder} as remote code")


def run_without_hf_moe(script: str, *arguments: str, description: str = "the check") -> dict:
    """Run `script` in a fresh Python process in which `import hf_moe` fails, and return what it saved.

    The script receives `arguments` as `sys.argv[1:]` plus, last, a path where it must `torch.save` its result.
    Raises `RuntimeError` with the subprocess's error output if it fails.
    """
    with tempfile.TemporaryDirectory() as scratch:
        result_path = Path(scratch) / "result.pt"
        command = [sys.executable, "-c", _BLOCK_HF_MOE + script, *arguments, str(result_path)]
        # cwd is the scratch folder so that a source checkout of hf_moe is not importable from the working directory.
        completed = subprocess.run(command, capture_output=True, text=True, cwd=scratch)
        if completed.returncode != 0:
            raise RuntimeError(f"{description} failed:\n{completed.stderr[-4000:]}")
        return torch.load(result_path)
