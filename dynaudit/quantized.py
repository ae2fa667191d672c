"""Quantized weights: FP8 dequantized exactly as it is read, every other scheme refused.

An FP8 weight (``F8_E4M3``, ``F8_E5M2`` and AMD's ``FNUZ`` variants) becomes float32 exactly.
When a scale tensor sits beside it — ``X.weight_scale_inv`` (DeepSeek-V3, Qwen FP8 and
transformers' fine-grained FP8, per 128 × 128 block by default) or ``X.weight_scale``
(compressed-tensors / llm-compressor, FBGEMM, ModelOpt: per tensor, per output row, per block
or per group) — the weight is multiplied by it in float32, each FP8 value by the scale of the
block it lies in. Both names mean "multiply": DeepSeek's ``weight_dequant``, transformers' FP8
dequantizer and compressed-tensors all compute ``fp8.float() * scale`` and only then cast to
the model's dtype, a step skipped here (the float32 product is kept). The scale tensors are
then not layers of their own.

Integer-packed schemes — GPTQ and AWQ (``qweight``/``qzeros``/``scales``), bitsandbytes
(``SCB``, ``absmax``, ``quant_map``, ``quant_state``), compressed-tensors' packed and int8
weights — and packed FP4/FP6 (MXFP4, NVFP4) are refused in one line (exit 3) that says what to
audit instead: their producers' dequantizers are not something dynaudit can reproduce and test
against here, and auditing the packed integers as they are stored would measure nothing real.

This module only reads names, dtypes and shapes (any object with ``dtype`` and ``shape``), and
the checkpoint's ``config.json``; :class:`dynaudit.tensors.Checkpoint` plans with it when it
opens and dequantizes with :func:`dequantize_fp8` when it reads.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from dynaudit.errors import QuantizedRefused, listed

if TYPE_CHECKING:
    from pathlib import Path

    import torch

__all__ = [
    "FP8_DTYPES",
    "Dequantization",
    "Fp8Scale",
    "dequantize_fp8",
    "plan_dequantization",
]

FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})
SCALE_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
# Sub-byte floats and power-of-two scales hold only microscaled (MX/NV) quantized weights.
PACKED_DTYPES = {
    "F4": "packed FP4 (MXFP4/NVFP4)",
    "F6_E2M3": "packed FP6",
    "F6_E3M2": "packed FP6",
    "F8_E8M0": "MX block-scaled (F8_E8M0 scales)",
}
# The quant_method values whose checkpoints can be FP8 with scales; the tensors decide.
FP8_METHODS = frozenset({"fp8", "fbgemm_fp8", "compressed-tensors", "modelopt"})
_METHODS = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "bitsandbytes": "bitsandbytes",
    "aqlm": "AQLM",
    "hqq": "HQQ",
    "eetq": "EETQ",
    "quanto": "quanto",
    "torchao": "torchao",
    "mxfp4": "MXFP4",
    "bitnet": "BitNet",
    "vptq": "VPTQ",
    "higgs": "HIGGS",
    "spqr": "SpQR",
    "auto-round": "AutoRound",
    "fp_quant": "FP-Quant",
}
# The last part of a tensor name that only a quantizer's state has.
_MARKERS = {
    "qweight": "GPTQ/AWQ packed int4",
    "qzeros": "GPTQ/AWQ packed int4",
    "g_idx": "GPTQ/AWQ packed int4",
    "SCB": "bitsandbytes int8",
    "weight_format": "bitsandbytes int8",
    "absmax": "bitsandbytes 4-bit (nf4/fp4)",
    "quant_map": "bitsandbytes 4-bit (nf4/fp4)",
    "nested_absmax": "bitsandbytes 4-bit (nf4/fp4)",
    "nested_quant_map": "bitsandbytes 4-bit (nf4/fp4)",
    "weight_packed": "compressed-tensors packed integer",
    "weight_global_scale": "NVFP4",
    "weight_zero_point": "zero-point (asymmetric) quantized",
}
_BNB_STATE = re.compile(r"\.quant_state\.bitsandbytes__\w+$")
_KINDS = {**_MARKERS, **PACKED_DTYPES, "quant_state": "bitsandbytes 4-bit (nf4/fp4)"}
_PRIORITY = list(_KINDS)
_SCALE_SUFFIXES = ("_scale_inv", "_scale")  # X.weight_scale_inv / X.weight_scale scale X.weight
_ACTIVATION_SCALES = frozenset(
    {"input_scale", "input_scale_inv", "output_scale", "activation_scale", "k_scale", "v_scale"}
)
_DEFAULT_BLOCK = (128, 128)  # DeepSeek-V3's and transformers' FineGrainedFP8Config default


class Header(Protocol):
    """What planning needs of a tensor: its header's dtype and shape."""

    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class Fp8Scale:
    """How an FP8 weight is scaled: tensor ``tensor`` holds one scale per ``block`` (rows ×
    columns of the weight seen as a matrix, its first dimension by the rest): the whole
    matrix for a per-tensor scale, ``(1, columns)`` for one per output row."""

    tensor: str
    block: tuple[int, int]
    scheme: str  # in words, for the report: "128×128 block scales"


@dataclass(frozen=True)
class Dequantization:
    """What :func:`plan_dequantization` found: the scale of each scaled FP8 weight, why each
    scale tensor is not a layer, and one line for the report (None without FP8 weights)."""

    scales: Mapping[str, Fp8Scale] = field(default_factory=dict)
    roles: Mapping[str, str] = field(default_factory=dict)
    note: str | None = None


NONE = Dequantization()


def plan_dequantization(
    tensors: Mapping[str, Header], config: Mapping[str, Any] | None, where: Path | str
) -> Dequantization:
    """The FP8 weights' scales, or :class:`~dynaudit.errors.QuantizedRefused` for quantized
    weights that are not FP8 (``where`` names the checkpoint in the message)."""
    quantization = (config or {}).get("quantization_config")
    quantization = quantization if isinstance(quantization, Mapping) else {}
    _refuse_other_schemes(tensors, quantization, where)
    fp8 = sorted(name for name, info in tensors.items() if info.dtype in FP8_DTYPES)
    blocks = _configured_blocks(quantization)
    scales: dict[str, Fp8Scale] = {}
    roles: dict[str, str] = {}
    for name in sorted(tensors):
        suffix = next((s for s in _SCALE_SUFFIXES if name.endswith(s)), None)
        weight = name[: -len(suffix)] if suffix else None
        if weight is None or weight not in tensors:
            continue
        target = tensors[weight]
        if target.dtype not in FP8_DTYPES:
            _refuse(
                where,
                f"{weight!r} ({target.dtype}) has a scale tensor {name!r}",
                "integer weights with scales" if _is_integer(target.dtype) else "scaled",
            )
        if weight in scales:
            _refuse(where, f"{weight!r} has two scale tensors", "FP8")
        scales[weight] = _scale_of(name, tensors[name], weight, target.shape, blocks, where)
        roles[name] = f"FP8 scale of {weight}"
    for name in tensors:
        module, _, last = name.rpartition(".")
        if last in _ACTIVATION_SCALES and f"{module}.weight" in scales:
            roles[name] = f"FP8 activation scale of {module}"
    if not scales and not roles and not fp8:
        return NONE
    return Dequantization(scales, roles, _note(fp8, tensors, scales))


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
    """Multiply ``weight`` (float32, contiguous, the FP8 values) in place by ``scale``
    (float32, one value per ``block``): element (i, j) of the weight seen as a matrix by
    ``scale[i // block[0], j // block[1]]``. Each product is one float32 multiplication, so
    the result is bitwise the reference ``weight * scale`` expanded to the weight's shape;
    the expansion here is only along columns, one row of blocks wide."""
    rows = weight.shape[0] if weight.dim() else 1
    matrix = weight.view(rows, -1)
    columns = matrix.shape[1]
    b0, b1 = block
    per_block = scale.reshape(-(-rows // b0), -(-columns // b1))
    if per_block.shape[1] > 1:
        per_block = per_block.repeat_interleave(b1, dim=1)[:, :columns]
    whole = rows // b0
    if whole:
        matrix[: whole * b0].view(whole, b0, columns).mul_(per_block[:whole].unsqueeze(1))
    if rows % b0:
        matrix[whole * b0 :].mul_(per_block[whole])


def _scale_of(
    name: str,
    info: Header,
    weight: str,
    shape: tuple[int, ...],
    blocks: list[tuple[int, int]],
    where: Path | str,
) -> Fp8Scale:
    """The block each value of scale tensor ``name`` covers in the FP8 weight of ``shape``."""
    if info.dtype not in SCALE_DTYPES:
        _refuse(where, f"the scale {name!r} of {weight!r} is itself {info.dtype}", "two-level")
    rows = shape[0] if shape else 1
    columns = math.prod(shape[1:]) if shape else 1
    scale_shape = tuple(info.shape)
    for b0, b1 in blocks:
        if scale_shape == (-(-rows // b0), -(-columns // b1)):
            scheme = f"{b0}×{b1} block scales" if b0 > 1 else f"scales per {b1} columns"
            return Fp8Scale(name, (b0, b1), scheme)
    if math.prod(info.shape) == 1:
        return Fp8Scale(name, (rows, columns), "a per-tensor scale")
    if scale_shape in ((rows,), (rows, 1)):
        return Fp8Scale(name, (1, columns), "per-row scales")
    expected = ", ".join(
        f"{b0}×{b1} blocks: {[-(-rows // b0), -(-columns // b1)]}" for b0, b1 in blocks
    )
    _refuse(
        where,
        f"the scale {name!r} of {weight!r} has shape {list(info.shape)}, which fits neither a "
        f"per-tensor, a per-row nor a block scale of the weight's {list(shape)} ({expected})",
        "FP8",
    )


def _configured_blocks(quantization: Mapping[str, Any]) -> list[tuple[int, int]]:
    """The scale blocks config.json declares (``weight_block_size``; compressed-tensors'
    ``block_structure`` or ``group_size``), else DeepSeek-V3's 128 × 128."""
    found: list[tuple[int, int]] = []
    size = _pair(quantization.get("weight_block_size"))
    if size:
        found.append(size)
    groups = quantization.get("config_groups")
    for group in groups.values() if isinstance(groups, Mapping) else ():
        weights = group.get("weights") if isinstance(group, Mapping) else None
        if not isinstance(weights, Mapping):
            continue
        structure, group_size = _pair(weights.get("block_structure")), weights.get("group_size")
        if structure:
            found.append(structure)
        if isinstance(group_size, int) and not isinstance(group_size, bool) and group_size > 0:
            found.append((1, group_size))
    return found or [_DEFAULT_BLOCK]


def _pair(value: Any) -> tuple[int, int] | None:
    """``[rows, columns]`` of positive integers, as a tuple; None for anything else."""
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return value[0], value[1]
    return None


def _is_integer(dtype: str) -> bool:
    return dtype[0] in "IU"


def _refuse_other_schemes(
    tensors: Mapping[str, Header], quantization: Mapping[str, Any], where: Path | str
) -> None:
    """Refuse a config or tensors that declare a quantization other than FP8."""
    method = quantization.get("quant_method")
    if not isinstance(method, str) and (
        quantization.get("load_in_4bit") or quantization.get("load_in_8bit")
    ):
        method = "bitsandbytes"  # transformers 4.x configs before quant_method
    if isinstance(method, str) and method.lower() not in FP8_METHODS:
        scheme = _METHODS.get(method.lower(), f"{method!r}-quantized")
        _refuse(where, f"config.json's quantization_config names quant_method {method!r}", scheme)
    sparsity = quantization.get("sparsity_config")
    if isinstance(sparsity, Mapping) and sparsity.get("format") not in (None, "dense"):
        fmt = sparsity.get("format")
        _refuse(where, f"config.json's sparsity_config stores weights as {fmt!r}", "compressed")
    found: dict[str, list[str]] = {}  # marker → the tensors that carry it
    for name in sorted(tensors):
        last, dtype = name.rpartition(".")[2], tensors[name].dtype
        marker = last if last in _MARKERS else dtype if dtype in PACKED_DTYPES else None
        if marker is None and _BNB_STATE.search(name):
            marker = "quant_state"
        if marker is not None:
            found.setdefault(marker, []).append(name)
    if found:
        marker = min(found, key=_PRIORITY.index)  # qweight before g_idx: the telling name
        _refuse(where, f"tensors {listed(found[marker], 3)}", _KINDS[marker])


def _refuse(where: Path | str, evidence: str, scheme: str) -> NoReturn:
    if scheme.startswith("bitsandbytes"):
        how = (
            "load it with transformers, call model.dequantize() and save_pretrained() the "
            "float weights, then audit those"
        )
    else:
        how = (
            "dequantize it with the library that made it and save the float weights, then "
            "audit those"
        )
    raise QuantizedRefused(
        f"{where}: {scheme} weights ({evidence}) are not dequantized by dynaudit, and their "
        f"stored form cannot be audited as it is; audit the unquantized model they were made "
        f"from, or {how}",
        path=str(where),
    )


def _note(
    fp8: list[str], tensors: Mapping[str, Header], scales: Mapping[str, Fp8Scale]
) -> str | None:
    """One line for the report: how many FP8 tensors, of which dtypes, scaled how."""
    if not fp8:
        return None
    kinds = Counter(
        (
            tensors[name].dtype,
            f"× {scales[name].scheme} ({scales[name].tensor.rpartition('.')[2]})"
            if name in scales
            else "as stored (no scale tensor)",
        )
        for name in fp8
    )
    parts = [
        f"{count} {dtype} tensor{'s' if count > 1 else ''} {how}"
        for (dtype, how), count in sorted(kinds.items())
    ]
    return "dequantized from FP8 to float32 as read: " + "; ".join(parts)
