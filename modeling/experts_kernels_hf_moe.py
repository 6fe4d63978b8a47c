"""The matmuls of hf_moe's experts: a grouped matmul over rows sorted by expert, and a CPU autograd kernel for
SwiGLU experts that trains with fewer large allocations than autograd's own graph.

Performance code with no model logic: `MoeExperts` in `modeling_hf_moe.py` decides which of these runs. This file
is copied next to the weights with the modeling file (which imports it relatively) and loaded as remote code, so it
imports only torch and transformers.
"""

import torch
from transformers.integrations.moe import _grouped_mm


def _is_16_byte_aligned(tensor: torch.Tensor) -> bool:
    size = tensor.element_size()
    strides_aligned = all((stride * size) % 16 == 0 for stride in tensor.stride() if stride != 1)
    # The CPU kernel accepts any base address (weights memory-mapped from safetensors often sit at 8-byte offsets);
    # a traced graph has no addresses to read (transformers' dispatcher then picks a compile-safe kernel itself).
    return strides_aligned and (tensor.device.type == "cpu" or torch.compiler.is_compiling()
                                or tensor.data_ptr() % 16 == 0)


def grouped_matmul(inputs: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`inputs (rows, in)` sorted by group, `weights (groups, in, out)`, `offsets (groups,)` cumulative row counts.

    torch's grouped matmul kernel through transformers' dispatcher; that kernel needs 16-byte aligned strides (odd
    inner sizes break it) and a float32/bfloat16/float16 dtype, so other cases take transformers' loop-of-matmuls
    custom op, which has its own backward.
    """
    # The backward pass multiplies by (rows, out) gradients, so the output width must be aligned as well.
    output_row_bytes = weights.shape[-1] * inputs.element_size()
    supported_dtype = inputs.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if supported_dtype and _is_16_byte_aligned(inputs) and _is_16_byte_aligned(weights) and output_row_bytes % 16 == 0:
        return _grouped_mm(inputs, weights, offsets)
    return torch.ops.transformers.grouped_mm_fallback(inputs, weights.to(inputs.dtype), offs=offsets)


def _expert_row_spans(group_ends: list[int]):
    """`(expert, start, end)` of every expert that received rows, from cumulative row counts."""
    start = 0
    for expert, end in enumerate(group_ends):
        if end > start:
            yield expert, start, end
        start = end


def _group_sizes(group_ends: list[int]) -> list[int]:
    """Rows per expert, from cumulative row counts."""
    return [end - start for start, end in zip([0, *group_ends[:-1]], group_ends, strict=True)]


def _expert_workspaces(like: torch.Tensor, group_ends: list[int], *widths: int) -> list[torch.Tensor]:
    """One (largest expert's rows, width) buffer per width, reused by every expert: one allocation per call instead
    of one per expert and activation (fresh large allocations are paid in page faults on CPU)."""
    rows = max(_group_sizes(group_ends), default=0)
    return [like.new_empty(rows, width) for width in widths]


def cpu_swiglu_experts_forward(inputs: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                               group_ends: list[int], gate_up_out: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU experts on rows sorted by expert: `inputs (rows, H)`, `gate_up_proj (E, 2I, H)`, `down_proj (E, H, I)`.

    Each expert's activations live in workspaces reused from expert to expert (they stay in cache); `gate_up_out
    (rows, 2I)`, when given, receives the gate/up projections for backward.
    """
    inner = down_proj.shape[-1]
    outputs = inputs.new_empty(inputs.shape[0], down_proj.shape[1])  # (rows, H)
    if gate_up_out is None:
        activated_space, gate_up_space = _expert_workspaces(inputs, group_ends, inner, 2 * inner)
    else:
        (activated_space,) = _expert_workspaces(inputs, group_ends, inner)
    for expert, start, end in _expert_row_spans(group_ends):
        gate_up = gate_up_space[:end - start] if gate_up_out is None else gate_up_out[start:end]  # (rows_e, 2I)
        torch.mm(inputs[start:end], gate_up_proj[expert].t(), out=gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        activated = torch.ops.aten.silu.out(gate, out=activated_space[:end - start]).mul_(up)
        torch.mm(activated, down_proj[expert].t(), out=outputs[start:end])
    return outputs


class CpuSwiGLUExperts(torch.autograd.Function):
    """Training path of the SwiGLU experts on CPU: the same matmuls as torch's grouped matmul, fewer big allocations.

    On CPU torch's grouped matmul is itself a loop of one `mm` per expert. What costs extra is memory: autograd keeps
    the gate/up output, SiLU output and SwiGLU product, and its backward allocates five more activation-sized tensors;
    with many narrow rows (MH-MoE: tokens x heads x k sub-token assignments) each fresh multi-hundred-MB tensor is
    paid in page faults and in a pass through main memory. Here forward keeps only the gate/up projections, backward
    recomputes each expert's SwiGLU product while it is in cache and writes the gradients into the buffers of the
    activations they replace. Saved tensors go through `save_for_backward` (gradient checkpointing's hooks apply);
    backward consumes them, so a second backward through the same graph is refused by autograd's in-place check.
    """

    @staticmethod
    def forward(ctx, inputs, gate_up_proj, down_proj, group_ends):
        gate_up = inputs.new_empty(inputs.shape[0], gate_up_proj.shape[1])  # (rows, 2I), kept for backward
        outputs = cpu_swiglu_experts_forward(inputs, gate_up_proj, down_proj, group_ends, gate_up_out=gate_up)
        ctx.save_for_backward(inputs, gate_up_proj, down_proj, gate_up)
        ctx.group_ends = group_ends
        return outputs

    @staticmethod
    def backward(ctx, grad_outputs):
        inputs, gate_up_proj, down_proj, gate_up = ctx.saved_tensors
        need_inputs, need_gate_up_proj, need_down_proj = ctx.needs_input_grad[:3]
        grad_outputs = grad_outputs.contiguous()
        # Every row belongs to one expert's span, so every gradient row and expert is written below (experts that
        # received no rows get zero weight gradients); no zero-filled activation-sized buffer is needed.
        grad_inputs = torch.empty_like(inputs) if need_inputs else None
        grad_gate_up_proj = torch.empty_like(gate_up_proj) if need_gate_up_proj else None
        grad_down_proj = torch.empty_like(down_proj) if need_down_proj else None
        unused_experts = [expert for expert, rows in enumerate(_group_sizes(ctx.group_ends)) if rows == 0]
        for grad_weight in (grad_gate_up_proj, grad_down_proj):
            if grad_weight is not None:
                grad_weight[unused_experts] = 0
        inner = down_proj.shape[-1]
        workspaces = _expert_workspaces(inputs, ctx.group_ends, inner, inner, inner)
        for expert, start, end in _expert_row_spans(ctx.group_ends):
            silu_gate, activated, grad_silu = (workspace[:end - start] for workspace in workspaces)  # (rows_e, I)
            grad_out = grad_outputs[start:end]  # (rows_e, H)
            gate_up_rows = gate_up[start:end]  # (rows_e, 2I); becomes d loss / d gate_up below
            gate, up = gate_up_rows.chunk(2, dim=-1)
            torch.ops.aten.silu.out(gate, out=silu_gate)  # recomputed while in cache
            torch.mul(silu_gate, up, out=activated)
            if need_down_proj:
                torch.mm(grad_out.t(), activated, out=grad_down_proj[expert])
            grad_activated = torch.mm(grad_out, down_proj[expert], out=activated)  # the product is no longer needed
            torch.mul(grad_activated, up, out=grad_silu)
            torch.mul(silu_gate, grad_activated, out=up)  # d loss / d up
            torch.ops.aten.silu_backward.grad_input(grad_silu, gate, grad_input=gate)  # d loss / d gate
            if need_gate_up_proj:
                torch.mm(gate_up_rows.t(), inputs[start:end], out=grad_gate_up_proj[expert])
            if need_inputs:
                torch.mm(gate_up_rows, gate_up_proj[expert], out=grad_inputs[start:end])
        return grad_inputs, grad_gate_up_proj, grad_down_proj, None


def cpu_swiglu_experts(inputs: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                       offsets: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts on CPU rows sorted by expert, `offsets (E,)` their cumulative counts: `CpuSwiGLUExperts` when a
    gradient is needed, else the plain forward. The weights are cast to the rows' dtype."""
    gate_up_proj = gate_up_proj.to(inputs.dtype)
    down_proj = down_proj.to(inputs.dtype)
    group_ends = offsets.tolist()  # a CPU tensor: no device sync
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (inputs, gate_up_proj, down_proj))
    if needs_grad:
        return CpuSwiGLUExperts.apply(inputs, gate_up_proj, down_proj, group_ends)
    return cpu_swiglu_experts_forward(inputs, gate_up_proj, down_proj, group_ends)
