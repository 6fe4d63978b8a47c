"""The CPU SwiGLU experts path (`CpuSwiGLUExperts`) against torch's grouped matmul path it replaces on CPU."""

import pytest
import torch

from hf_moe.modeling import MHMoeConfig, MoeConfig, SwitchConfig, experts_kernels_hf_moe
from hf_moe.modeling.experts_kernels_hf_moe import CpuSwiGLUExperts
from hf_moe.modeling.modeling_hf_moe import MHMoeSparseBlock, MoeExperts, MoeSparseBlock

BLOCKS = {
    "hf_moe": (MoeSparseBlock, MoeConfig(hidden_size=32, num_attention_heads=4, moe_intermediate_size=48,
                                         num_experts=16, num_experts_per_tok=2)),
    "hf_switch": (MoeSparseBlock, SwitchConfig(hidden_size=32, num_attention_heads=4, moe_intermediate_size=48,
                                               num_experts=16, capacity_factor=1.0)),
    "hf_mh_moe": (MHMoeSparseBlock, MHMoeConfig(hidden_size=32, num_attention_heads=4, moe_intermediate_size=24,
                                                num_experts=40, num_experts_per_tok=2, num_moe_heads=4)),
}


def _block(model_type, dtype):
    cls, config = BLOCKS[model_type]
    torch.manual_seed(0)
    block = cls(config).to(dtype).train()
    for parameter in block.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    block.gate.jitter_noise = 0.0
    return block


def _forward_backward(block, hidden, use_cpu_path, monkeypatch):
    monkeypatch.setattr(MoeExperts, "_use_cpu_swiglu", lambda self, inputs: use_cpu_path)
    block.zero_grad(set_to_none=True)
    leaf = hidden.clone().requires_grad_()
    output = block(leaf)
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).reshape(output.shape)
    (output * weights).sum().backward()
    grads = {name: p.grad for name, p in block.named_parameters()}
    return output.detach(), leaf.grad, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("model_type", list(BLOCKS))
def test_cpu_path_equals_grouped_matmul_path_in_outputs_and_every_gradient(model_type, dtype, monkeypatch):
    block = _block(model_type, dtype)
    hidden = torch.randn(2, 5, 32, dtype=dtype)  # 20-40 assignments on 16-40 experts: several experts get no rows
    fast = _forward_backward(block, hidden, True, monkeypatch)
    reference = _forward_backward(block, hidden, False, monkeypatch)
    assert (fast[0] - reference[0]).abs().max().item() <= 1e-6
    assert (fast[1] - reference[1]).abs().max().item() <= 1e-6
    empty_experts = (reference[2]["experts.down_proj"].flatten(1).abs().sum(-1) == 0).sum().item()
    assert empty_experts > 0  # the zero gradient of an expert without rows is covered
    for name, grad in reference[2].items():
        assert fast[2][name] is not None, name
        assert (fast[2][name] - grad).abs().max().item() <= 1e-6, name


def test_cpu_path_is_what_cpu_training_and_inference_use(monkeypatch):
    calls = {"train": 0, "inference": 0}
    train_apply, inference_forward = CpuSwiGLUExperts.apply, experts_kernels_hf_moe.cpu_swiglu_experts_forward

    def counting_apply(*args):
        calls["train"] += 1
        return train_apply(*args)

    def counting_forward(*args, **kwargs):
        calls["inference"] += 1 if "gate_up_out" not in kwargs else 0
        return inference_forward(*args, **kwargs)

    monkeypatch.setattr(CpuSwiGLUExperts, "apply", counting_apply)
    monkeypatch.setattr(experts_kernels_hf_moe, "cpu_swiglu_experts_forward", counting_forward)
    block = _block("hf_mh_moe", torch.float32)
    hidden = torch.randn(1, 4, 32)
    block(hidden).sum().backward()
    with torch.no_grad():
        block(hidden)
    assert calls == {"train": 1, "inference": 1}


def test_frozen_experts_get_no_weight_gradient_and_the_input_still_does():
    block = _block("hf_moe", torch.float32)
    block.experts.requires_grad_(False)
    leaf = torch.randn(1, 6, 32, requires_grad=True)
    block(leaf).square().sum().backward()
    assert block.experts.gate_up_proj.grad is None and block.experts.down_proj.grad is None
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0 and block.gate.weight.grad is not None


def test_a_second_backward_through_the_same_graph_is_refused_not_wrong():
    # Backward overwrites the saved activations with their gradients; autograd's version check must catch a reuse.
    block = _block("hf_moe", torch.float32)
    output = block(torch.randn(1, 6, 32, requires_grad=True)).sum()
    output.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        output.backward()


def test_expert_dropout_and_other_activations_keep_the_grouped_matmul_path():
    config = MoeConfig(hidden_size=32, num_attention_heads=4, moe_intermediate_size=48, num_experts=4,
                       expert_dropout=0.1)
    experts = MoeSparseBlock(config).train().experts
    inputs = torch.randn(3, 32)
    assert not experts._use_cpu_swiglu(inputs)
    assert experts.eval()._use_cpu_swiglu(inputs)
    gelu = MoeSparseBlock(MoeConfig(hidden_size=32, num_attention_heads=4, moe_intermediate_size=48, num_experts=4,
                                    hidden_act="gelu")).experts
    assert not gelu._use_cpu_swiglu(inputs)


def test_block_benchmark_runs_the_chosen_rows_and_rejects_unknown_ones():
    from hf_moe.recipes.benchmark_blocks import SparseBlockBenchmarkArguments, benchmark_sparse_blocks

    small = dict(hidden_size=64, moe_intermediate_size=64, num_tokens=32, repeats=1, decode=False)
    rows = benchmark_sparse_blocks(SparseBlockBenchmarkArguments(**small, blocks="hf_mh_moe"))
    assert [row["block"].split()[0] for row in rows] == ["hf_mh_moe"]
    assert rows[0]["vs_dense_forward_backward"] > 0 and "vs_mixtral_forward" not in rows[0]
    with pytest.raises(ValueError, match="hf_moe, hf_switch, hf_mh_moe"):
        benchmark_sparse_blocks(SparseBlockBenchmarkArguments(**small, blocks="mixtral"))


def test_stats_overhead_benchmark_runs():
    from hf_moe.recipes.benchmark_blocks import StatsOverheadArguments, benchmark_stats_overhead

    result = benchmark_stats_overhead(StatsOverheadArguments(hidden_size=64, num_hidden_layers=2, vocab_size=100,
                                                             batch_size=2, sequence_length=8, repeats=1))
    assert result["plain_step_s"] > 0 and result["overhead_ratio"] > 0
