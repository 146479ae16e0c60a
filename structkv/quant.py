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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from structkv.errors import StructKVError

QUANTS = ("none", "int8", "int4")
GROUP_SIZES = (16, 32, 64, 128, 256)
DEFAULT_GROUP = 32
#: ``--quant-compute`` -> MatMulNBits ``accuracy_level``.
COMPUTE = {"int8": 4, "fp32": 0}


@dataclass(frozen=True)
class QuantSpec:
    """``bits`` 4 or 8, ``group`` input features per scale (a power of two >= 16, as the ONNX
    Runtime operators require)."""

    bits: int
    group: int = DEFAULT_GROUP
    #: MatMulNBits ``accuracy_level``: 4 = activations quantised to int8 per block, so the
    #: product runs on int8 dot-product units (AVX-512 VNNI here); 0 = dequantise to fp32.
    accuracy_level: int = 4

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
        return f"int{self.bits}"

    @property
    def suffix(self) -> str:
        """Initializer name suffix of a weight stored in this format."""
        return f"::q{self.bits}g{self.group}"

    def check_width(self, k: int, what: str) -> None:
        """A group must divide the input width K of every quantised matrix."""
        if k % self.group:
            fits = [g for g in GROUP_SIZES if k % g == 0]
            raise StructKVError(
                f"--group-size {self.group} does not divide the input width {k} of {what}; "
                f"choose {' or '.join(map(str, fits)) if fits else 'another model'}"
            )

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "group_size": self.group,
            "accuracy_level": self.accuracy_level,
            "format": "MatMulNBits/GatherBlockQuantized, symmetric, no zero points",
        }


def quantize_rows(w: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype):
    """Rows of a ``[N, K]`` weight -> (packed ``uint8 [N, K/group, group·bits/8]``, scales
    ``[N, K/group]`` in ``scale_dtype``). Computed in fp32 whatever the checkpoint's dtype."""
    n, k = w.shape
    spec.check_width(k, "a weight")
    blocks = w.float().reshape(n, k // spec.group, spec.group)
    top = (1 << (spec.bits - 1)) - 1
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
    q = packed
    if spec.bits == 4:
        q = torch.stack([q & 0xF, q >> 4], dim=-1).flatten(-2)
    w = (q.float() - (1 << (spec.bits - 1))) * scales.float().unsqueeze(-1)
    return w.reshape(q.shape[0], -1)


def fake_quantize(model: torch.nn.Module, spec: QuantSpec) -> torch.nn.Module:
    """Replace, in place, each weight an engine of ``spec`` quantises (every ``nn.Linear`` and
    the input embedding) by its dequantised value: the torch oracle of a quantised engine."""
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
    return model
