"""Weight-only block quantisation (int8 / int4), the one definition every path shares.

Why one module: the exporter packs weights into ONNX Runtime's ``MatMulNBits`` /
``GatherBlockQuantized`` layout, and the torch path must be able to run the *same* quantised
model (``fake_quantize``) so an engine and its oracle compare like with like. Both call
:func:`quantize_rows`.

The format is ONNX Runtime's (``com.microsoft`` contrib ops, also what onnxruntime-genai
writes): a weight ``W`` of shape ``[N, K]`` (PyTorch's ``nn.Linear`` layout, output features
first) is cut into blocks of ``group`` consecutive input features; each block has one scale
``s = max|w| / (2^(bits-1) - 1)`` and stores ``q = round(w / s) + 2^(bits-1)`` as unsigned
``bits``-bit integers, so ``w ≈ (q - 2^(bits-1)) · s`` (symmetric: no zero-point tensor, the
operators' default zero point is ``2^(bits-1)``). Packed along K, low nibble first for int4:
``[N, K / group, group · bits / 8]`` bytes, which read as ``[N, K · bits / 8]`` is exactly the
embedding table ``GatherBlockQuantized`` gathers rows from — one copy serves a tied embedding
and LM head.

``w8a8`` is the prefill format: weights int8 with one scale per output channel (``[N, K]`` int8,
scales ``[N]``, ``w ≈ q · s``) and activations quantised to int8 per token at run time
(``s_x = max|x| / 127``), so the whole product is an integer GEMM (ONNX Runtime
``MatMulIntegerToFloat``: VNNI / AMX dot products) and only its int32 result is scaled. Weight
-only int8 (``MatMulNBits``) must dequantise or re-quantise per block inside the product, which
at thousands of prompt rows costs nearly what fp32 does; w8a8 trades a per-token activation
error (KL to fp32 ~1e-2 on SmolLM2, docs/BENCHMARKS.md) for a product 2-3x faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from structkv.errors import StructKVError

QUANTS = ("none", "int8", "int4", "w8a8")
GROUP_SIZES = (16, 32, 64, 128, 256)
DEFAULT_GROUP = 32
#: ``--quant-compute`` -> MatMulNBits ``accuracy_level``.
COMPUTE = {"int8": 4, "fp32": 0}


@dataclass(frozen=True)
class QuantSpec:
    """``bits`` 4 or 8, ``group`` input features per scale (a power of two >= 16, as the ONNX
    Runtime operators require; 0 = one scale per output channel, w8a8 only)."""

    bits: int
    group: int = DEFAULT_GROUP
    #: MatMulNBits ``accuracy_level``: 4 = activations quantised to int8 per block, so the
    #: product runs on int8 dot-product units (AVX-512 VNNI here); 0 = dequantise to fp32.
    accuracy_level: int = 4
    #: w8a8: activations quantised to int8 per token in the graph (MatMulIntegerToFloat).
    per_token: bool = False

    @classmethod
    def parse(
        cls, quant: str | None, group: int | None = None, compute: str = "int8"
    ) -> QuantSpec | None:
        """``--quant`` / ``--group-size`` / ``--quant-compute`` as given on a command line
        (``none`` -> None)."""
        if quant in (None, "none", "fp"):
            if group is not None or compute != "int8":
                flag = "--group-size" if group is not None else "--quant-compute"
                raise StructKVError(f"{flag} needs --quant int8 or int4")
            return None
        if quant == "w8a8":
            if group is not None:
                raise StructKVError(
                    "--group-size applies to --quant int8/int4; w8a8 has one scale per output "
                    "channel (and per token for activations)"
                )
            if compute != "int8":
                raise StructKVError("--quant w8a8 computes in int8; drop --quant-compute")
            return cls(bits=8, group=0, accuracy_level=0, per_token=True)
        if quant not in QUANTS:
            raise StructKVError(f"unsupported --quant {quant!r}; choose one of {', '.join(QUANTS)}")
        group = DEFAULT_GROUP if group is None else group
        if group not in GROUP_SIZES:
            raise StructKVError(
                f"--group-size {group} is not supported; ONNX Runtime's block-quantised "
                f"operators take a power of two >= 16: {', '.join(map(str, GROUP_SIZES))}"
            )
        if compute not in COMPUTE:
            raise StructKVError(
                f"unsupported --quant-compute {compute!r}; choose one of {', '.join(COMPUTE)}"
            )
        return cls(bits=int(quant[3:]), group=group, accuracy_level=COMPUTE[compute])

    @property
    def name(self) -> str:
        return "w8a8" if self.per_token else f"int{self.bits}"

    @property
    def suffix(self) -> str:
        """Initializer name suffix of a weight stored in this format."""
        return f"::q{self.bits}g{self.group}"

    def blocks(self, k: int) -> int:
        """Scales per row of a ``[N, k]`` weight."""
        return 1 if self.group == 0 else k // self.group

    def check_width(self, k: int, what: str) -> None:
        """A group must divide the input width K of every quantised matrix."""
        if self.group and k % self.group:
            fits = [g for g in GROUP_SIZES if k % g == 0]
            raise StructKVError(
                f"--group-size {self.group} does not divide the input width {k} of {what}; "
                f"choose {' or '.join(map(str, fits)) if fits else 'another model'}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        """The spec a manifest's ``quant`` entry (:meth:`to_dict`) describes."""
        if d.get("group_size") == 0:
            return cls(bits=8, group=0, accuracy_level=0, per_token=True)
        return cls(d["bits"], d["group_size"], d.get("accuracy_level", 4))

    def to_dict(self) -> dict:
        if self.per_token:
            return {
                "bits": 8,
                "group_size": 0,
                "activations": "int8 per token, dynamic",
                "format": "MatMulIntegerToFloat: int8 weights [N, K], one scale per output "
                "channel; activations quantised per token in the graph",
            }
        return {
            "bits": self.bits,
            "group_size": self.group,
            "accuracy_level": self.accuracy_level,
            "format": "MatMulNBits/GatherBlockQuantized, symmetric, no zero points",
        }


def quantize_rows(w: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype):
    """Rows of a ``[N, K]`` weight -> (packed ``uint8 [N, K/group, group·bits/8]``, scales
    ``[N, K/group]`` in ``scale_dtype``); w8a8: (``int8 [N, K]``, scales ``[N]``). Computed in
    fp32 whatever the checkpoint's dtype."""
    n, k = w.shape
    spec.check_width(k, "a weight")
    top = (1 << (spec.bits - 1)) - 1
    if spec.group == 0:  # per output channel, signed: MatMulIntegerToFloat's int8 B
        scales = (w.float().abs().amax(-1) / top).to(scale_dtype)
        s = scales.float().unsqueeze(-1)
        q = torch.where(s > 0, torch.round(w.float() / torch.where(s > 0, s, 1)), 0)
        return q.clamp(-top, top).to(torch.int8).contiguous(), scales.contiguous()
    blocks = w.float().reshape(n, k // spec.group, spec.group)
    # the scale is rounded to its stored dtype *before* quantising, so q fits what is stored
    scales = (blocks.abs().amax(-1) / top).to(scale_dtype)
    s = scales.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(blocks / torch.where(s > 0, s, 1)), 0)
    q = (q.clamp(-top - 1, top) + top + 1).to(torch.uint8)
    if spec.bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q.contiguous(), scales.contiguous()


def dequantize_rows(packed: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Inverse of :func:`quantize_rows` (fp32 ``[N, K]``)."""
    if spec.group == 0:
        return packed.float() * scales.float().unsqueeze(-1)
    q = packed
    if spec.bits == 4:
        q = torch.stack([q & 0xF, q >> 4], dim=-1).flatten(-2)
    w = (q.float() - (1 << (spec.bits - 1))) * scales.float().unsqueeze(-1)
    return w.reshape(q.shape[0], -1)


def quantize_tokens(x: torch.Tensor) -> torch.Tensor:
    """``x`` with each row (token) through int8 and back, as a w8a8 engine quantises the input
    of every product: scale ``max|x| / 127`` (a row of zeros stays zero), round half to even."""
    s = (x.float().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-30)
    return (torch.round(x.float() / s) * s).to(x.dtype)


def fake_quantize(model: torch.nn.Module, spec: QuantSpec) -> torch.nn.Module:
    """Replace, in place, each weight an engine of ``spec`` quantises (every ``nn.Linear`` and
    the input embedding) by its dequantised value: the torch oracle of a quantised engine.
    w8a8 also quantises each ``nn.Linear``'s input per token (a forward pre-hook)."""
    scale_dtype = next(model.parameters()).dtype
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                w = module.weight
                if id(w) in seen:  # a tied embedding / LM head is one tensor
                    continue
                seen.add(id(w))
                packed, scales = quantize_rows(w.data, spec, scale_dtype)
                w.data.copy_(dequantize_rows(packed, scales, spec).to(w.dtype))
        if spec.per_token:
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.register_forward_pre_hook(lambda _, args: (quantize_tokens(args[0]),))
    return model
