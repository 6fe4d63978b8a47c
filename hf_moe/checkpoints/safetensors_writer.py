"""Writing a state dict as sharded safetensors while it is produced, holding at most one shard in memory."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def parse_size(size: str | int) -> int:
    """'2GB' / '500MB' / bytes -> bytes."""
    if isinstance(size, int):
        return size
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "B": 1}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


class ShardedSafetensorsWriter:
    """`add()` tensors in order; a shard is written whenever the buffered tensors reach `max_shard_bytes`.

    `finish()` renames the shards to transformers' `model-0000i-of-0000n.safetensors` pattern and writes
    `model.safetensors.index.json` (or a single `model.safetensors`).
    """

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.names: set[str] = set()
        self.elements_by_dtype: dict[torch.dtype, int] = {}

    @property
    def weights_dtype(self) -> torch.dtype | None:
        """The floating-point dtype holding the most elements: the weights' (small float32 router buffers or
        integer counters beside bfloat16 weights do not make a bfloat16 model float32)."""
        floating = {dtype: count for dtype, count in self.elements_by_dtype.items() if dtype.is_floating_point}
        return max(floating, key=floating.get) if floating else None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self.buffer[name] = tensor.contiguous()
        self.names.add(name)
        self.elements_by_dtype[tensor.dtype] = self.elements_by_dtype.get(tensor.dtype, 0) + tensor.numel()
        self.buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> list[Path]:
        if self.buffer or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            final = self.folder / "model.safetensors"
            self.shards[0][0].rename(final)
            return [final]
        count = len(self.shards)
        weight_map, finals = {}, []
        for index, (path, names) in enumerate(self.shards, start=1):
            final = self.folder / f"model-{index:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        index_file = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
        return finals
