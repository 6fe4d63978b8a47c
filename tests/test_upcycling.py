"""Upcycling tiny random Llama / Mistral / Qwen2 / Qwen3 checkpoints: exactness, init options, errors, memory."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from hf_moe import UnsupportedCheckpointError, upcycle
from hf_moe.cli import main as cli_main
from hf_moe.remote_check import load_as_remote_code

TINY_DENSE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
ARCH_OPTIONS = {
    "llama": dict(tie_word_embeddings=True),
    "mistral": dict(sliding_window=4),
    "qwen2": dict(),
    "qwen3": dict(head_dim=16),
}


def _make_dense(folder, model_type: str, sharded: bool):
    config = AutoConfig.for_model(model_type, **TINY_DENSE, **ARCH_OPTIONS[model_type])
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random everything, biases and norms included, so a wrong mapping cannot hide
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2 + (1.0 if parameter.dim() == 1 else 0.0))
    model.save_pretrained(folder, max_shard_size="30KB" if sharded else "1GB")
    return model.eval()


@pytest.fixture(scope="module", params=[(t, s) for t in ARCH_OPTIONS for s in (False, True)],
                ids=[f"{t}-{'sharded' if s else 'single'}" for t in ARCH_OPTIONS for s in (False, True)])
def dense_checkpoint(request, tmp_path_factory):
    model_type, sharded = request.param
    folder = tmp_path_factory.mktemp(f"{model_type}-{sharded}")
    model = _make_dense(folder, model_type, sharded)
    assert (folder / "model.safetensors.index.json").exists() == sharded
    return folder, model


def _ids():
    return torch.tensor([[5, 17, 33, 8, 61, 2, 44, 90, 12, 7]])


@pytest.mark.parametrize("arch", ["hf_moe", "hf_switch"])
def test_copy_upcycling_computes_the_dense_function(dense_checkpoint, arch, tmp_path):
    source, dense = dense_checkpoint
    folder = upcycle(str(source), str(tmp_path / "moe"), arch=arch, num_experts=4)
    moe = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert moe.config.model_type == arch and moe.config.base_model is None  # a local source has no Hub id
    with torch.no_grad():
        float32_difference = (moe(input_ids=_ids()).logits - dense(input_ids=_ids()).logits).abs().max().item()
        float64_difference = (moe.double()(input_ids=_ids()).logits
                              - dense.double()(input_ids=_ids()).logits).abs().max().item()
    assert float32_difference <= 1e-4
    assert float64_difference <= 1e-10  # the same function, not just close
    dense.float()
    generate = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(moe.float().generate(_ids(), **generate), dense.generate(_ids(), **generate))


def test_upcycled_switch_router_still_gets_gradient(tmp_path):
    source = tmp_path / "llama"
    _make_dense(source, "llama", sharded=False)
    folder = upcycle(str(source), str(tmp_path / "switch"), arch="hf_switch", num_experts=4)
    moe = AutoModelForCausalLM.from_pretrained(folder).train()
    out = moe(input_ids=_ids(), labels=_ids())
    out.lm_loss.backward()  # the LM loss alone, not the aux losses
    assert moe.model.layers[0].mlp.gate.weight.grad.abs().sum().item() > 0
    assert moe.config.capacity_factor is None and moe.config.eval_capacity_factor is None
    capped = upcycle(str(source), str(tmp_path / "capped"), arch="hf_switch", num_experts=4, capacity_factor=1.25)
    assert AutoModelForCausalLM.from_pretrained(capped).config.capacity_factor == 1.25


def test_every_other_layer_and_explicit_lists(tmp_path):
    source = tmp_path / "qwen3"
    _make_dense(source, "qwen3", sharded=False)
    folder = upcycle(str(source), str(tmp_path / "moe"), moe_layers="every_other", num_experts=4)
    moe = AutoModelForCausalLM.from_pretrained(folder)
    assert moe.config.sparse_layer_indices == [1]
    assert type(moe.model.layers[0].mlp).__name__ == "MoeMLP"
    assert type(moe.model.layers[1].mlp).__name__ == "MoeSparseBlock"
    folder = upcycle(str(source), str(tmp_path / "moe2"), moe_layers="0,2", num_experts=4)
    assert json.loads((folder / "config.json").read_text())["sparse_layers"] == [0, 2]


def test_upcycled_folder_carries_code_card_and_loads_as_remote_code(tmp_path):
    source = tmp_path / "mistral"
    dense = _make_dense(source, "mistral", sharded=False)
    folder = upcycle(str(source), str(tmp_path / "moe"), num_experts=4)
    assert {"modeling_hf_moe.py", "configuration_hf_moe.py", "README.md", "config.json"} <= {
        p.name for p in folder.iterdir()}
    card = (folder / "README.md").read_text()
    assert str(source) not in card and "base_model" not in card  # never a local path
    remote = load_as_remote_code(folder, _ids(), max_new_tokens=6)
    with torch.no_grad():
        assert (remote["logits"] - dense(input_ids=_ids()).logits).abs().max().item() <= 1e-4


def test_mh_moe_upcycling_reports_a_finite_deviation(tmp_path):
    from hf_moe import verify_upcycling
    from hf_moe.upcycling import open_dense_checkpoint

    source = tmp_path / "llama"
    _make_dense(source, "llama", sharded=False)
    folder = upcycle(str(source), str(tmp_path / "mh"), arch="hf_mh_moe", num_experts=4, num_moe_heads=2)
    moe = AutoModelForCausalLM.from_pretrained(folder)
    block = moe.model.layers[0].mlp
    assert torch.equal(block.head_proj.weight, torch.eye(32)) and torch.equal(block.merge_proj.weight, torch.eye(32))
    assert block.experts.gate_up_proj.shape == (4, 128, 16)
    report = verify_upcycling(open_dense_checkpoint(str(source)), folder, prompts=None, input_ids=[_ids()],
                              max_new_tokens=4)
    assert 0 < report["max_abs_logit_difference"] < float("inf")


def test_drop_upcycle_reinitialises_the_requested_fraction(tmp_path):
    source = tmp_path / "llama"
    dense = _make_dense(source, "llama", sharded=False)
    folder = upcycle(str(source), str(tmp_path / "drop"), expert_init="drop_upcycle", drop_ratio=0.25,
                     num_experts=4)
    moe = AutoModelForCausalLM.from_pretrained(folder)
    dense_gate = dense.model.layers[0].mlp.gate_proj.weight
    dense_down = dense.model.layers[0].mlp.down_proj.weight
    experts = moe.model.layers[0].mlp.experts
    changed_sets = []
    for expert in range(4):
        gate_rows = ~(experts.gate_up_proj[expert, :64] == dense_gate).all(dim=1)
        up_rows = ~(experts.gate_up_proj[expert, 64:] == dense.model.layers[0].mlp.up_proj.weight).all(dim=1)
        down_cols = ~(experts.down_proj[expert] == dense_down).all(dim=0)
        assert gate_rows.sum().item() == 16  # 25% of 64 neurons
        assert torch.equal(gate_rows, up_rows) and torch.equal(gate_rows, down_cols)
        changed_sets.append(tuple(gate_rows.nonzero().squeeze(1).tolist()))
    assert len(set(changed_sets)) > 1  # each expert drops its own neurons


def test_split_experts_shapes_router_groups_and_exactness(tmp_path):
    source = tmp_path / "llama"
    dense = _make_dense(source, "llama", sharded=False)
    folder = upcycle(str(source), str(tmp_path / "split"), expert_init="split", granularity=2, num_experts=8,
                     top_k=2)
    moe = AutoModelForCausalLM.from_pretrained(folder).eval()
    block = moe.model.layers[0].mlp
    assert moe.config.moe_intermediate_size == 32
    assert block.experts.gate_up_proj.shape == (8, 64, 32) and block.experts.down_proj.shape == (8, 32, 32)
    router = block.gate.weight
    for group in range(4):
        assert torch.equal(router[2 * group], router[2 * group + 1])
    assert not torch.equal(router[0], router[2])
    # Shard g of every virtual copy is the g-th half of the dense neurons; down is scaled by G = 2.
    dense_mlp = dense.model.layers[0].mlp
    assert torch.equal(block.experts.gate_up_proj[3, :32], dense_mlp.gate_proj.weight[32:])
    assert torch.allclose(block.experts.down_proj[3], 2 * dense_mlp.down_proj.weight[:, 32:])
    # top-k = G with renormalisation picks one whole virtual copy: exact again.
    with torch.no_grad():
        difference = (moe.double()(input_ids=_ids()).logits - dense.double()(input_ids=_ids()).logits).abs().max()
    assert difference.item() < 1e-10


def test_noise_breaks_equivalence_on_purpose(tmp_path):
    source = tmp_path / "llama"
    dense = _make_dense(source, "llama", sharded=False)
    folder = upcycle(str(source), str(tmp_path / "noisy"), noise_std=0.1, num_experts=4)
    moe = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert (moe(input_ids=_ids()).logits - dense(input_ids=_ids()).logits).abs().max().item() > 1e-3
    assert "on purpose" in (folder / "README.md").read_text()


def _no_output_left(parent, name):
    return not (parent / name).exists() and not list(parent.glob(f".{name}.*"))


def test_unsupported_architecture_names_what_is_supported_and_writes_nothing(tmp_path):
    source = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(source)
    with pytest.raises(UnsupportedCheckpointError, match=r"'gpt2' is not supported.*llama, mistral, qwen2, qwen3"):
        upcycle(str(source), str(tmp_path / "out"))
    assert _no_output_left(tmp_path, "out")


def test_corrupt_and_missing_files_give_clear_errors_and_write_nothing(tmp_path):
    source = tmp_path / "corrupt"
    _make_dense(source, "llama", sharded=False)
    (source / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UnsupportedCheckpointError, match="not a readable safetensors file"):
        upcycle(str(source), str(tmp_path / "out"))
    sharded = tmp_path / "sharded"
    _make_dense(sharded, "qwen2", sharded=True)
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(UnsupportedCheckpointError, match="shards listed in the index are missing"):
        upcycle(str(sharded), str(tmp_path / "out"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnsupportedCheckpointError, match="no config.json"):
        upcycle(str(empty), str(tmp_path / "out"))
    assert _no_output_left(tmp_path, "out")


def test_a_failure_while_writing_leaves_nothing_and_an_existing_folder_is_kept(tmp_path, monkeypatch):
    from hf_moe.checkpoints import safetensors_writer as writer

    source = tmp_path / "llama"
    _make_dense(source, "llama", sharded=False)
    calls = {"n": 0}
    original = writer.ShardedSafetensorsWriter.add

    def failing_add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError("disk full")
        original(self, name, tensor)

    monkeypatch.setattr(writer.ShardedSafetensorsWriter, "add", failing_add)
    with pytest.raises(OSError, match="disk full"):
        upcycle(str(source), str(tmp_path / "out"), max_shard_size="10KB")
    assert _no_output_left(tmp_path, "out")
    monkeypatch.setattr(writer.ShardedSafetensorsWriter, "add", original)

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        upcycle(str(source), str(existing))
    assert (existing / "keep.txt").read_text() == "mine"
    upcycle(str(source), str(existing), overwrite=True)
    assert not (existing / "keep.txt").exists() and (existing / "config.json").exists()


def test_output_is_sharded_when_larger_than_a_shard(tmp_path):
    source = tmp_path / "llama"
    dense = _make_dense(source, "llama", sharded=False)
    folder = upcycle(str(source), str(tmp_path / "moe"), max_shard_size="40KB", num_experts=4)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    moe = AutoModelForCausalLM.from_pretrained(folder).eval()  # every shard read back: the dense function
    ids = torch.randint(3, TINY_DENSE["vocab_size"], (2, 9))
    with torch.no_grad():
        assert (moe(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max().item() < 1e-4


def test_cli_takes_positional_source_and_output(tmp_path, capsys):
    source = tmp_path / "qwen2"
    _make_dense(source, "qwen2", sharded=False)
    cli_main(["upcycle", str(source), str(tmp_path / "cli"), "--arch", "hf_switch", "--num-experts", "4"])
    assert "upcycled model written to" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["model_type"] == "hf_switch"


def test_invalid_options_fail_before_anything_is_read(tmp_path):
    with pytest.raises(ValueError, match="`expert_init`='clone' is invalid"):
        upcycle("does/not-matter", str(tmp_path / "x"), expert_init="clone")
    with pytest.raises(ValueError, match="`arch`='hf_dense' is invalid"):
        upcycle("does/not-matter", str(tmp_path / "x"), arch="hf_dense")


MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import hf_moe
    from hf_moe import upcycle
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    upcycle(sys.argv[1], sys.argv[2], num_experts=8, max_shard_size="64MB")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "after_kib": after}))
    """
)


def test_memory_stays_bounded_when_upcycling_a_checkpoint_larger_than_a_shard(tmp_path):
    # Dense: 6 layers of 3 x 384 x 1536 float32 MLPs (~42 MB) in 16 MB shards; output: 8 experts (~300 MB).
    config = AutoConfig.for_model("llama", vocab_size=1000, hidden_size=384, intermediate_size=1536,
                                  num_hidden_layers=6, num_attention_heads=6)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "dense", max_shard_size="16MB")
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "dense"), str(tmp_path / "moe")],
                           capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    usage = json.loads(probe.stdout.strip().splitlines()[-1])
    output_bytes = sum(p.stat().st_size for p in (tmp_path / "moe").glob("*.safetensors"))
    growth_bytes = (usage["after_kib"] - usage["before_kib"]) * 1024
    assert output_bytes > 250e6
    print(f"peak RSS growth {growth_bytes / 1e6:.0f} MB for a {output_bytes / 1e6:.0f} MB output")
    assert growth_bytes < 0.6 * output_bytes, (growth_bytes, output_bytes)


def _word_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(94)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.save_pretrained(folder)


def test_calibration_router_rows_come_from_each_experts_prompts(tmp_path):
    source = tmp_path / "llama"
    _make_dense(source, "llama", sharded=False)
    _word_tokenizer(source)
    prompts = [["w3 w4 w5", "w3 w4"], ["w60 w61 w62"], ["w80 w81"], ["w20 w21 w22 w23"]]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    folder = upcycle(str(source), str(tmp_path / "calibrated"), router_init="calibration", num_experts=4,
                     calibration_prompts=str(tmp_path / "prompts.json"))
    moe = AutoModelForCausalLM.from_pretrained(folder).eval()
    router = moe.model.layers[1].mlp.gate.weight
    assert torch.allclose(router.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert (router @ router.T - torch.eye(4)).abs().max().item() > 0.05  # distinct rows
    assert (folder / "tokenizer.json").exists()
    # Each expert's own (centred) mean MLP input scores highest on its own router row (Cauchy-Schwarz).
    dense = _make_dense(tmp_path / "again", "llama", sharded=False)
    captured = []
    dense.model.layers[1].post_attention_layernorm.register_forward_hook(lambda m, i, o: captured.append(o[0]))
    means = []
    for expert_prompts in prompts:
        captured.clear()
        for prompt in expert_prompts:
            ids = [int(word[1:]) + 3 for word in prompt.split()]
            dense(input_ids=torch.tensor([ids]))
        means.append(torch.stack([c.mean(0) for c in captured]).mean(0))
    means = torch.stack(means)
    scores = (means - means.mean(0)) @ router.T
    assert scores.argmax(dim=1).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="2 prompt lists; 4 are needed"):
        (tmp_path / "two.json").write_text(json.dumps(prompts[:2]))
        upcycle(str(source), str(tmp_path / "bad"), router_init="calibration", num_experts=4,
                calibration_prompts=str(tmp_path / "two.json"))
