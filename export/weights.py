"""One weights file shared by every graph of an engine (ONNX external data at offsets).

Each graph's exporter embeds its own copy of the weights it touches; here every initializer
larger than :data:`INLINE_BYTES` moves to ``weights.bin`` once (keyed by content, so the tied
embedding / LM head and the layers used by several graphs are stored once) and the graphs point
at it by offset. The engine directory is then about the size of the weights, whatever the
number of graphs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import numpy_helper

WEIGHTS_FILE = "weights.bin"
#: Small constants (shapes, scalars) stay inside their graph.
INLINE_BYTES = 1024
#: Offsets aligned for memory mapping.
ALIGN = 64


class WeightStore:
    """Appends unique tensors to ``weights.bin`` and rewrites initializers to reference them."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / WEIGHTS_FILE
        self._file = open(self.path, "wb")  # closed by close()
        self._index: dict[str, tuple[int, int]] = {}
        self.bytes = 0

    def externalize(self, model: onnx.ModelProto) -> None:
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise ValueError(f"initializer {tensor.name} is already external")
            raw = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
            if len(raw) <= INLINE_BYTES:
                continue
            key = hashlib.sha256(
                raw + str((tensor.data_type, tuple(tensor.dims))).encode()
            ).hexdigest()
            if key not in self._index:
                pad = -self._file.tell() % ALIGN
                self._file.write(b"\0" * pad)
                offset = self._file.tell()
                self._file.write(raw)
                self._index[key] = (offset, len(raw))
                self.bytes += len(raw)
            offset, length = self._index[key]
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                tensor.ClearField(field)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for k, v in (("location", WEIGHTS_FILE), ("offset", offset), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = k, str(v)

    def close(self) -> None:
        self._file.close()
