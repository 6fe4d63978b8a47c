"""Routing replay: record the experts each token was sent to, replay them in another forward (RL on MoE).

`docs/rl.md` tells when and why; `record_routing` / `replay_routing` are the context managers for plain loops,
`hf_moe.training.trl.MoeGRPOTrainer` wires both into TRL's GRPO.
"""

from .hooks import ExpertChoiceNotReplayable, RoutingRecorder, RoutingReplay, record_routing, replay_routing
from .trace import NOT_RECORDED, RoutingMismatch, RoutingTrace, RoutingTraceMismatch, routing_mismatch
from .vllm import trace_from_vllm, trace_to_vllm

__all__ = ["record_routing", "replay_routing", "RoutingRecorder", "RoutingReplay", "RoutingTrace",
           "RoutingTraceMismatch", "RoutingMismatch", "routing_mismatch", "ExpertChoiceNotReplayable",
           "NOT_RECORDED", "trace_from_vllm", "trace_to_vllm"]
