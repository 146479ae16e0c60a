"""Export without the weights in memory: trace a placeholder model, then stream each weight.

Why: a 32B model is 64 GB in bf16, more than an export machine's free memory, and tracing
does not need the weights' values — only their shapes and dtypes. So the exporter traces a
model whose parameters are stride-0 placeholders (a few bytes each, the right shape and dtype),
leaves each graph's weight initializers *pending* (named by their checkpoint tensor, plus a
transpose where the graph multiplies by a transposed weight), and afterwards
:func:`bind_weights` reads each checkpoint tensor once, converts and lays it out, and appends
it to ``weights.bin``. Peak memory is about one tensor plus the traced graphs.

The checkpoint is read with plain file reads (the safetensors header gives every tensor's
offset), not memory-mapped: mapped pages of a 64 GB file would count as resident memory.
"""

from __future__ import annotations

import json
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from structkv.errors import StructKVError
from structkv.export.weights import PENDING

#: Suffix of an initializer that is its checkpoint tensor transposed (2-D weights).
TRANSPOSED = "::T"
#: Suffix of an initializer that views the bytes of another (a quantised table's rows).
VIEW = ".rows"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


class SafetensorsCheckpoint:
    """A Hugging Face directory's ``model.safetensors`` or ``model-0000x-of-0000y``
    shards (with ``model.safetensors.index.json``), read one tensor at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise StructKVError(
                f"{self.directory} has no model.safetensors or model.safetensors.index.json: "
                "export streams safetensors checkpoints; convert .bin weights with "
                "transformers' save_pretrained(safe_serialization=True)"
            )
        missing = [name for name in files if not (self.directory / name).is_file()]
        if missing:
            raise StructKVError(
                f"{self.directory}: shard {missing[0]} is missing ({len(missing)} of "
                f"{len(files)} shards missing); download the checkpoint again"
            )
        self.entries: dict[str, _Entry] = {}
        for name in files:
            self.entries.update(_read_header(self.directory / name))

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard into a fresh buffer."""
        shape = self.entries[name].shape
        return self.read_rows(name, 0, shape[0] if shape else 1)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (its first axis), read with one file read."""
        e = self.entries[name]
        shape = e.shape or (1,)
        row = (e.end - e.start) // shape[0] if shape[0] else 0
        buffer = bytearray(row * (stop - start))
        with open(e.file, "rb") as f:
            f.seek(e.start + row * start)
            if f.readinto(buffer) != len(buffer):
                raise StructKVError(f"{e.file} is truncated (tensor {name}); re-download it")
        block = (stop - start, *shape[1:])
        if not buffer:
            out = torch.empty(block, dtype=e.dtype)
        else:
            out = torch.frombuffer(buffer, dtype=e.dtype).reshape(block)
        return out if e.shape else out.reshape(())


def _read_header(path: Path) -> dict[str, _Entry]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise StructKVError(f"{path} is not a safetensors file (too short); re-download it")
        (size,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(size))
        except (ValueError, UnicodeDecodeError):
            raise StructKVError(
                f"{path} has a corrupt safetensors header; re-download it"
            ) from None
    base = 8 + size
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise StructKVError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        entries[name] = _Entry(
            path, _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), base + start, base + end
        )
    return entries


class StateDictCheckpoint:
    """A model already in memory (tiny test models) behind the same interface."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.tensors = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.tensors[name][start:stop]


def vectors(checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's 1-D tensors (norm weights, biases): kilobytes per layer, so they are
    given real values at trace time (the graph optimizer folds and deduplicates small
    constants, which needs their values)."""
    out = {}
    for name in checkpoint.names():
        shape = checkpoint.shape(name)
        if len(shape) <= 1:
            out[name] = checkpoint.read(name).clone()
    return out


def placeholder_model(
    config, dtype: torch.dtype, vectors: dict[str, torch.Tensor], names: frozenset[str]
):
    """The model of ``config`` with its matrices as stride-0 placeholders (a few bytes each, the
    real shapes and ``dtype``; tied weights stay one parameter), its 1-D parameters from
    ``vectors`` (:func:`vectors`), and real rotary buffers (computed from the config; the
    graphs bake them in). Each placeholder records its checkpoint name as ``_structkv_name``:
    of a tied weight's names, the one the checkpoint ``names`` has (checkpoints store a tied
    embedding / LM head under either)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    aliases: dict[int, list[str]] = {}
    for full, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(full)
    made: dict[int, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                full = f"{module_name}.{name}" if module_name else name
                if param.dim() <= 1:
                    if full not in vectors:
                        raise StructKVError(
                            f"the checkpoint has no tensor {full!r} that the model's config "
                            "needs; is the directory complete?"
                        )
                    value = vectors[full].to(dtype).reshape(param.shape)
                    made[id(param)] = torch.nn.Parameter(value, requires_grad=False)
                else:
                    stub = torch.nn.Parameter(
                        torch.zeros(1, dtype=dtype).expand(param.shape), requires_grad=False
                    )
                    known = [a for a in aliases[id(param)] if a in names]
                    stub._structkv_name = known[0] if known else full
                    made[id(param)] = stub
            module._parameters[name] = made[id(param)]
    for module_name, module in model.named_modules():
        if any(b is not None and b.is_meta for b in module._buffers.values()):
            if not hasattr(module, "rope_init_fn") and "rotary" not in module_name:
                raise StructKVError(
                    f"cannot rebuild buffers of {module_name} ({type(module).__name__}) without "
                    "the weights; this architecture is not supported by streaming export"
                )
            # in the engine's dtype, as `model.to(dtype)` leaves them on the torch path
            rebuilt = type(module)(config=config).to(dtype)
            parent_name, _, attr = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, rebuilt)
    return model


def checkpoint_names(module: torch.nn.Module) -> dict[str, str]:
    """Parameter name inside ``module`` (a stage wrapper: what the traced graph's initializers
    are called) -> the checkpoint tensor it stands for."""
    return {
        name: p._structkv_name
        for name, p in module.named_parameters(remove_duplicate=False)
        if hasattr(p, "_structkv_name")
    }


def defer_weights(model, names: dict[str, str]) -> list:
    """Make a traced ``onnx_ir`` model's weights pending: each parameter initializer is renamed
    to its checkpoint tensor and points at :data:`PENDING`; a ``Transpose`` of a weight becomes
    an initializer of its own (``name::T``), laid out transposed when it is written. No weight
    value is ever read here. Returns the pending initializers (see :func:`unvalued`)."""
    import onnx_ir as ir

    graph = model.graph
    params = {v.name: v for v in graph.initializers.values() if v.name in names}
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.inputs[0]
        if source is None or source.name not in params or len(source.shape) != 2:
            continue
        perm = node.attributes.get("perm")
        if perm is not None and list(perm.as_ints()) != [1, 0]:
            continue
        name = names[source.name] + TRANSPOSED
        shape = ir.Shape([source.shape[1], source.shape[0]])
        if name in graph.initializers:
            lifted = graph.initializers[name]
        else:
            lifted = ir.Value(name=name, shape=shape, type=source.type)
            lifted.const_value = _pending(name, source.dtype, shape)
            graph.register_initializer(lifted)
        ir.convenience.replace_all_uses_with(node.outputs[0], lifted)
        graph.remove(node, safe=True)
        if not source.uses():
            graph.initializers.pop(source.name)
            params.pop(source.name)
    for traced, value in params.items():
        graph.initializers.pop(traced)
        value.name = names[traced]
        value.const_value = _pending(value.name, value.dtype, value.shape)
        graph.register_initializer(value)
    return [v for v in graph.initializers.values() if _is_pending(v.const_value)]


def _is_pending(tensor) -> bool:
    import onnx_ir as ir

    return isinstance(tensor, ir.ExternalTensor) and tensor.location == PENDING


@contextmanager
def unvalued(values: list):
    """The graph optimizer without the pending weights' values: it neither folds nor
    deduplicates what has no value (and would otherwise read the not-yet-written file)."""
    import logging

    tensors = [v.const_value for v in values]
    quiet = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns about every initializer without a value
    for v in values:
        v.const_value = None
    try:
        yield
    finally:
        for v, t in zip(values, tensors):
            v.const_value = t
        quiet.setLevel(level)


def _pending(name: str, dtype, shape):
    import onnx_ir as ir

    nbytes = int(dtype.itemsize * int(torch.tensor(list(shape), dtype=torch.int64).prod()))
    return ir.ExternalTensor(PENDING, 0, nbytes, dtype, shape=shape, name=name)


def pending_tensors(graphs: list[Path]) -> dict[str, int]:
    """Every pending initializer of the saved ``graphs``: name -> bytes (each counted once)."""
    import onnx

    out = {}
    for path in graphs:
        proto = onnx.load(str(path), load_external_data=False)
        for init in proto.graph.initializer:
            info = {e.key: e.value for e in init.external_data}
            if info.get("location") == PENDING and not init.name.endswith(VIEW):
                out[init.name] = int(info["length"])  # another view of stored bytes: none
    return out


def check_disk_space(directory: Path, needed: int) -> None:
    """Refuse before writing when ``directory``'s filesystem cannot hold ``needed`` bytes."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise StructKVError(
            f"not enough disk space in {directory}: the engine's weights need "
            f"{needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free; free some space or "
            "choose another --out"
        )


#: Source bytes converted and written per step: what bounds the export's memory beyond the
#: traced graphs, whatever the size of the largest tensor.
BLOCK_BYTES = 64 * 2**20


def bind_weights(
    graphs: list[Path], checkpoint, store, dtype: torch.dtype, bar=None, derived=None
) -> None:
    """Write every pending weight of ``graphs`` into ``store`` (each checkpoint tensor read
    once, in blocks of rows, converted to ``dtype``, transposed where named so) and point the
    graphs at it."""
    import onnx

    written: dict[str, tuple[int, int]] = {}
    for path in graphs:
        proto = onnx.load(str(path), load_external_data=False)
        for init in proto.graph.initializer:
            info = {e.key: e.value for e in init.external_data}
            if info.get("location") != PENDING:
                continue
            if init.name not in written:
                if bar is not None:
                    bar.set_postfix_str(init.name, refresh=False)
                # a tensor derived from a checkpoint tensor (--quant: packed + scales in one
                # pass): ``derived`` writes it and returns (offset, length) per name it wrote
                made = derived(checkpoint, init.name, dtype, store, bar) if derived else None
                if made is not None:
                    written.update(made)
                else:
                    length = int(info["length"])
                    offset = store.reserve(f"checkpoint:{init.name}", length)
                    _stream_tensor(checkpoint, init.name, dtype, store, offset, length, bar)
                    written[init.name] = (offset, length)
            offset, length = written[init.name]
            del init.external_data[:]
            for k, v in (("location", store.name), ("offset", offset), ("length", length)):
                init.external_data.add(key=k, value=str(v))
        onnx.save(proto, str(path))


def _bytes(t: torch.Tensor):
    """A contiguous tensor's buffer without a copy (bf16 through its 16-bit pattern)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().reshape(-1).view("uint8")


def _stream_tensor(checkpoint, name, dtype, store, offset, length, bar) -> None:
    """Convert one checkpoint matrix block by block into the reserved ``[offset, +length)``:
    rows in order, or (``::T``) each block's rows as a column band of the transposed matrix."""
    transposed = name.endswith(TRANSPOSED)
    base = name[: -len(TRANSPOSED)] if transposed else name
    if base not in checkpoint.names():
        raise StructKVError(
            f"the checkpoint has no tensor {base!r} that the model's config needs; is the "
            "directory complete (all shards of model.safetensors.index.json)?"
        )
    shape = checkpoint.shape(base)
    rows, cols = shape[0], int(torch.tensor(shape[1:], dtype=torch.int64).prod())
    itemsize = torch.empty((), dtype=dtype).element_size()
    if rows * cols * itemsize != length:
        raise StructKVError(
            f"checkpoint tensor {base} has shape {list(shape)}, which the model's config does "
            "not expect; is config.json the checkpoint's own?"
        )
    step = max(1, BLOCK_BYTES // max(1, cols * itemsize))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = checkpoint.read_rows(base, start, stop).to(dtype)
        if not transposed:
            store.write_at(offset + start * cols * itemsize, _bytes(block))
        else:
            band = _bytes(block.reshape(stop - start, cols).t())  # [cols, stop - start]
            width = (stop - start) * itemsize
            for j in range(cols):
                at = offset + (j * rows + start) * itemsize
                store.write_at(at, band[j * width : (j + 1) * width])
        if bar is not None:
            bar.update((stop - start) * cols * itemsize)
