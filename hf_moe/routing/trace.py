"""`RoutingTrace`: which experts every token position was sent to, in every sparse layer of one batch.

The unit that routing replay moves around: recorded from a forward or a `generate` (`record_routing`), read from
vLLM's `routed_experts` payloads (`hf_moe.routing.vllm`), replayed in a training forward (`replay_routing`), saved
and loaded as safetensors, sliced along the batch like every other tensor of a batch (TRL splits and shuffles it
with the rest), and compared with another trace (`routing_mismatch`).

Layout: `experts (batch, layers, seq, rows_per_token, k)` integer, the experts of each router row in the router's
order; `rows_per_token` is 1, or MH-MoE's h sub-tokens. `NOT_RECORDED` (-1) marks positions no forward routed (the
last generated token, which no forward ever reads; positions a payload does not cover); replay leaves those rows to
the live router. `attention_mask (batch, seq)` marks real tokens (left padding and padding are 0).
"""

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

NOT_RECORDED = -1
_FORMAT = "hf_moe.routing_trace/1"


class RoutingTraceMismatch(ValueError):
    """The trace does not fit the model or the forward it is replayed in; the message says what differs."""


@dataclass(frozen=True)
class RoutingTrace:
    """The routing of one batch (see the module docstring for the layout)."""

    experts: torch.Tensor  # (batch, layers, seq, rows_per_token, k) integer; NOT_RECORDED where no forward routed
    attention_mask: torch.Tensor  # (batch, seq) bool: real tokens
    layers: tuple[int, ...]  # the decoder-layer index of each sparse layer, in order
    num_experts: int
    model_type: str | None = None

    def __post_init__(self):
        if self.experts.dim() != 5:
            raise RoutingTraceMismatch(f"RoutingTrace.experts must be (batch, layers, seq, rows_per_token, k), got "
                                       f"shape {tuple(self.experts.shape)}")
        if tuple(self.attention_mask.shape) != (self.batch_size, self.length):
            raise RoutingTraceMismatch(f"RoutingTrace.attention_mask must be (batch, seq) = "
                                       f"{(self.batch_size, self.length)}, got {tuple(self.attention_mask.shape)}")
        if self.experts.shape[1] != len(self.layers):
            raise RoutingTraceMismatch(f"RoutingTrace.experts has {self.experts.shape[1]} layers, `layers` names "
                                       f"{len(self.layers)}")

    @property
    def batch_size(self) -> int:
        return self.experts.shape[0]

    @property
    def length(self) -> int:
        return self.experts.shape[2]

    @property
    def rows_per_token(self) -> int:
        return self.experts.shape[3]

    @property
    def top_k(self) -> int:
        return self.experts.shape[4]

    @property
    def recorded(self) -> torch.Tensor:
        """(batch, seq) bool: positions routed in every layer."""
        return (self.experts >= 0).all(-1).all(-1).all(1)

    # -------------------------------------------------------------------------------- batch and length
    def select(self, rows) -> "RoutingTrace":
        """The trace of some sequences of the batch (`rows`: an index, a slice, a list or a tensor)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        return replace(self, experts=self.experts[rows], attention_mask=self.attention_mask[rows])

    def resized(self, length: int) -> "RoutingTrace":
        """The first `length` positions; positions beyond the trace are NOT_RECORDED padding."""
        if length <= self.length:
            return replace(self, experts=self.experts[:, :, :length], attention_mask=self.attention_mask[:, :length])
        extra = length - self.length
        experts = torch.cat([self.experts, self.experts.new_full((*self.experts.shape[:2], extra,
                                                                  *self.experts.shape[3:]), NOT_RECORDED)], dim=2)
        mask = torch.cat([self.attention_mask, self.attention_mask.new_zeros(self.batch_size, extra)], dim=1)
        return replace(self, experts=experts, attention_mask=mask)

    @classmethod
    def concatenate(cls, traces: list["RoutingTrace"]) -> "RoutingTrace":
        """One trace of the sequences of `traces` (same model), padded on the right to the longest."""
        length = max(trace.length for trace in traces)
        first = traces[0]
        for trace in traces[1:]:
            trace.check_same_model(first)
        resized = [trace.resized(length) for trace in traces]
        return replace(first, experts=torch.cat([trace.experts for trace in resized]),
                       attention_mask=torch.cat([trace.attention_mask for trace in resized]))

    # -------------------------------------------------------------------------------- fitting a model
    def check_same_model(self, other: "RoutingTrace") -> None:
        """Raise RoutingTraceMismatch naming what differs between the models of the two traces."""
        self.check_fits(other.layers, other.num_experts, other.top_k, other.rows_per_token, other.model_type)

    def check_fits(self, layers: tuple[int, ...], num_experts: int, top_k: int, rows_per_token: int | None = None,
                   model_type: str | None = None) -> None:
        """Raise RoutingTraceMismatch when the trace is not of a model with these sparse layers, E, k (and rows per
        token, model type when given)."""
        differences = []
        if model_type is not None and self.model_type is not None and model_type != self.model_type:
            differences.append(f"model_type {self.model_type!r} vs {model_type!r}")
        if tuple(layers) != tuple(self.layers):
            differences.append(f"sparse layers {list(self.layers)} vs {list(layers)}")
        if num_experts != self.num_experts:
            differences.append(f"{self.num_experts} experts vs {num_experts}")
        if top_k != self.top_k:
            differences.append(f"k={self.top_k} vs k={top_k}")
        if rows_per_token is not None and rows_per_token != self.rows_per_token:
            differences.append(f"{self.rows_per_token} router rows per token vs {rows_per_token}")
        if differences:
            raise RoutingTraceMismatch("the routing trace is of another model: " + ", ".join(differences)
                                       + " (trace vs model)")

    # -------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write the trace as one safetensors file (through a temporary file: never half written)."""
        path = Path(path)
        dtype = torch.int16 if self.num_experts < 2 ** 15 else torch.int32
        metadata = {"format": _FORMAT, "layers": ",".join(map(str, self.layers)),
                    "num_experts": str(self.num_experts), "model_type": self.model_type or ""}
        temporary = path.with_name(f".{path.name}.tmp")
        save_file({"experts": self.experts.to(dtype).contiguous().cpu(),
                   "attention_mask": self.attention_mask.to(torch.uint8).contiguous().cpu()},
                  str(temporary), metadata=metadata)
        temporary.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise RoutingTraceMismatch(f"{path} is not a routing trace saved by hf_moe (format "
                                       f"{metadata.get('format')!r}, expected {_FORMAT!r})")
        tensors = load_file(str(path))
        layers = tuple(int(index) for index in metadata["layers"].split(",") if index)
        return cls(tensors["experts"].long(), tensors["attention_mask"].bool(), layers,
                   int(metadata["num_experts"]), metadata.get("model_type") or None)


@dataclass(frozen=True)
class RoutingMismatch:
    """How two traces of the same tokens differ: over the real positions both recorded."""

    token_share: float  # share of tokens with at least one sparse layer routed to another set of experts
    layer_share: tuple[float, ...]  # per sparse layer: share of tokens routed to another set of experts
    tokens: int  # tokens compared

    @property
    def mean_layer_share(self) -> float:
        return sum(self.layer_share) / max(len(self.layer_share), 1)


def routing_mismatch(trace: RoutingTrace, other: RoutingTrace) -> RoutingMismatch:
    """Compare the expert *sets* (order-free) each token was sent to in two traces of the same batch; a token of
    MH-MoE differs in a layer when any of its sub-tokens does."""
    trace.check_same_model(other)
    length = min(trace.length, other.length)
    if trace.batch_size != other.batch_size:
        raise RoutingTraceMismatch(f"the traces hold {trace.batch_size} and {other.batch_size} sequences")
    first, second = trace.resized(length), other.resized(length)
    compared = first.recorded & second.recorded & first.attention_mask & second.attention_mask.to(first.experts.device)
    differs = (first.experts.sort(-1).values != second.experts.to(first.experts.device).sort(-1).values)
    differs = differs.any(-1).any(-1)  # (batch, layers, seq)
    tokens = int(compared.sum())
    per_layer = (differs & compared[:, None]).sum((0, 2)).float() / max(tokens, 1)
    any_layer = (differs.any(1) & compared).sum().item() / max(tokens, 1)
    return RoutingMismatch(float(any_layer), tuple(per_layer.tolist()), tokens)
