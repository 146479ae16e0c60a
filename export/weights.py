"""One weights file shared by every graph of an engine (ONNX external data at offsets).

Each graph's exporter embeds its own copy of the weights it touches; here every initializer
larger than :data:`INLINE_BYTES` moves to ``weights.bin`` once (keyed by content, so the tied
embedding / LM head and the layers used by several graphs are stored once) and the graphs point
at it by offset. The engine directory is then about the size of the weights, whatever the
number of graphs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

WEIGHTS_FILE = "weights.bin"
#: Where a weight not yet streamed from the checkpoint points (export/checkpoint.py).
PENDING = "structkv.pending"
#: Small constants (shapes, scalars) stay inside their graph.
INLINE_BYTES = 1024
#: Offsets aligned for memory mapping.
ALIGN = 64


def _key(raw: bytes, dtype, shape: tuple) -> str:
    """Content key of a tensor: its bytes, dtype (an ``onnx_ir.DataType``) and shape."""
    return hashlib.sha256(raw + f"{dtype.name}{tuple(int(d) for d in shape)}".encode()).hexdigest()


class WeightStore:
    """Appends unique tensors to ``weights.bin`` and points initializers at them.

    Works on the exporter's in-memory IR (``onnx_ir``), one tensor at a time: no whole-model
    ``ModelProto`` copy is ever built, so peak memory stays near the model's own weights."""

    def __init__(self, directory: Path, name: str = WEIGHTS_FILE) -> None:
        self.directory = directory
        self.name = name
        self.path = directory / name
        self._file = open(self.path, "wb")  # closed by close()
        self._index: dict[str, tuple[int, int]] = {}
        self.bytes = 0

    def _append(self, raw: bytes, key: str) -> tuple[int, int]:
        if key not in self._index:
            self._file.write(b"\0" * (-self._file.tell() % ALIGN))
            offset = self._file.tell()
            self._file.write(raw)
            self._index[key] = (offset, len(raw))
            self.bytes += len(raw)
        return self._index[key]

    def reserve(self, key: str, length: int) -> int:
        """An aligned region of ``length`` bytes at the end of the file for ``key`` (filled by
        :meth:`write_at`): streaming export writes a weight block by block, and knows it by its
        checkpoint name, so it is never hashed."""
        if key in self._index:
            return self._index[key][0]
        end = self._file.seek(0, os.SEEK_END)
        offset = end + (-end % ALIGN)
        self._file.truncate(offset + length)
        self._file.seek(offset + length)
        self._index[key] = (offset, length)
        self.bytes += length
        return offset

    def write_at(self, offset: int, data) -> None:
        """Write ``data`` (any buffer) at ``offset`` without moving the append position."""
        self._file.flush()
        view = memoryview(data).cast("B")
        while view:
            done = os.pwrite(self._file.fileno(), view, offset)
            view, offset = view[done:], offset + done

    def absorb(self, graph: Path, part: Path) -> None:
        """Re-point a graph saved by another process's store (its own weights file ``part``)
        at this store: each external tensor is copied over once (deduplicated by content, so
        the weights a parallel trace shares with this process's graphs are stored once)."""
        import onnx
        import onnx_ir as ir

        proto = onnx.load(str(graph), load_external_data=False)
        with open(part, "rb") as source:
            for init in proto.graph.initializer:
                if init.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                info = {e.key: e.value for e in init.external_data}
                if info.get("location") == PENDING:  # written later by bind_weights
                    continue
                source.seek(int(info["offset"]))
                raw = source.read(int(info["length"]))
                key = _key(raw, ir.DataType(init.data_type), tuple(init.dims))
                offset, length = self._append(raw, key)
                del init.external_data[:]
                for k, v in (("location", WEIGHTS_FILE), ("offset", offset), ("length", length)):
                    init.external_data.add(key=k, value=str(v))
        self._file.flush()
        onnx.save(proto, str(graph))

    def externalize_ir(self, model) -> None:
        """Move every initializer above :data:`INLINE_BYTES` of an ``onnx_ir`` model to the
        shared file (deduplicated by content)."""
        import onnx_ir as ir

        self._file.flush()
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            if tensor is None or tensor.nbytes <= INLINE_BYTES:
                continue
            if isinstance(tensor, ir.ExternalTensor) and tensor.location == PENDING:
                continue  # a checkpoint weight: written later by bind_weights
            raw = tensor.tobytes()
            offset, length = self._append(raw, _key(raw, tensor.dtype, tuple(tensor.shape)))
            del raw
            value.const_value = ir.ExternalTensor(
                self.name,
                offset,
                length,
                tensor.dtype,
                shape=tensor.shape,
                name=name,
                base_dir=self.directory,
            )
        self._file.flush()

    def close(self) -> None:
        self._file.close()
