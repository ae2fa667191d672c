"""Dtypes and quantized weights (issue 22 item 2): every safetensors dtype's header is read,
FP8 weights with their scales are dequantized exactly as they are read, and GPTQ, AWQ and
bitsandbytes checkpoints are refused in one line with exit 3.

The FP8 checkpoints are real: a tiny LLaMA saved by transformers, its linear layers converted
with the block quantizer of tests/producers.py and written with safetensors' own FP8 dtypes.
The reference dequantization below is written from the formats' definition (each FP8 value
times the scale of its block, in float32) and reads the files with safetensors, not dynaudit.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dynaudit
from dynaudit.errors import CorruptCheckpoint, QuantizedRefused
from dynaudit.families.naming import skip_reason
from dynaudit.tensors import DTYPE_BITS, Checkpoint, read_header
from tests import producers
from tests.cli import run_cli
from tests.conftest import small_settings

# Every dtype safetensors 0.8 defines, with the torch dtype safetensors reads it as (None:
# header only, torch has none).
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
    "U64": torch.uint64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "C64": torch.complex64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E8M0": None, "F4": None, "F6_E2M3": None,
    "F6_E3M2": None,
}  # fmt: skip
FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _raw_file(path: Path, entries: dict[str, tuple[str, list[int], int]]) -> Path:
    """A safetensors file written byte by byte: name → (dtype, shape, data bytes)."""
    header, offset = {}, 0
    for name, (dtype, shape, nbytes) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(offset))
    return path


def test_every_safetensors_dtype_has_a_header_size() -> None:
    assert set(DTYPE_BITS) == set(SAFETENSORS_DTYPES)


def test_every_dtype_header_is_read_as_safetensors_reads_it(tmp_path: Path) -> None:
    """Four elements of each dtype (F4 and F6 pack them into 2 and 3 bytes): dynaudit and
    safetensors accept the same file."""
    entries = {f"t.{d}": (d, [2, 2], 4 * DTYPE_BITS[d] // 8) for d in SAFETENSORS_DTYPES}
    path = _raw_file(tmp_path / "all.safetensors", entries)
    tensors, _ = read_header(path)
    assert {n: (t.dtype, t.shape, t.nbytes) for n, t in tensors.items()} == {
        n: (d, tuple(s), b) for n, (d, s, b) in entries.items()
    }
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(entries)
        for name, (dtype, _, _) in entries.items():
            if SAFETENSORS_DTYPES[dtype] is not None:
                assert f.get_tensor(name).dtype == SAFETENSORS_DTYPES[dtype]


def test_a_sub_byte_tensor_must_fill_whole_bytes(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "f4.safetensors", {"w": ("F4", [3], 2)})
    with pytest.raises(CorruptCheckpoint, match="whole bytes"):
        read_header(path)
    with pytest.raises(Exception, match="byte boundary"):  # safetensors refuses it too
        safe_open(str(path), "pt")


def test_f64_and_fp8_are_read_exactly_and_other_dtypes_are_not_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    values = {
        "f64.weight": torch.randn(4, 3, dtype=torch.float64),
        "e4m3.weight": torch.randn(4, 3).to(torch.float8_e4m3fn),
        "e5m2.weight": torch.randn(4, 3).to(torch.float8_e5m2),
        "i8.weight": torch.randint(-128, 127, (4, 3), dtype=torch.int8),
        "u8.weight": torch.randint(0, 255, (4, 3), dtype=torch.uint8),
        "mask": torch.ones(4, 4, dtype=torch.bool),
        "position_ids": torch.arange(8).reshape(1, 8),
    }
    save_file(values, str(tmp_path / "model.safetensors"))
    with Checkpoint.open(tmp_path / "model.safetensors") as checkpoint:
        assert torch.equal(checkpoint.read("f64.weight"), values["f64.weight"].float())
        for name in ("e4m3.weight", "e5m2.weight"):
            assert torch.equal(checkpoint.read(name), values[name].float())
        for name, dtype in [("i8.weight", "I8"), ("u8.weight", "U8"), ("mask", "BOOL"),
                            ("position_ids", "I64")]:  # fmt: skip
            info = checkpoint.tensors[name]
            assert (info.dtype, info.is_float) == (dtype, False)
            assert skip_reason(info) == f"non-float dtype {dtype}"
            with pytest.raises(CorruptCheckpoint, match="not a float weight"):
                checkpoint.read(name)
        assert checkpoint.selection_note == (
            "dequantized from FP8 to float32 as read: 1 F8_E4M3 tensor as stored (no scale "
            "tensor); 1 F8_E5M2 tensor as stored (no scale tensor)"
        )


def test_integer_and_boolean_tensors_are_skipped_with_their_reason(tmp_path: Path) -> None:
    """A torch module with integer and boolean buffers: the generic family skips them,
    naming the dtype, and audits the float matrices."""
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    module.register_buffer("mask", torch.ones(16, 8, dtype=torch.bool))
    module.register_buffer("counts", torch.zeros(16, 8, dtype=torch.int64))
    producers.save_module(module, tmp_path / "m")
    found = dynaudit.inspect(tmp_path / "m", family="generic")
    assert [layer.name for layer in found.layers] == ["0.weight", "2.weight"]
    skipped = {s.name: s.skipped for s in found.skipped}
    assert skipped["mask"] == "non-float dtype BOOL"
    assert skipped["counts"] == "non-float dtype I64"


# ── FP8 ──────────────────────────────────────────────────────────────────────────────────


def expand(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int] | None) -> torch.Tensor:
    """The scale of each element of a weight of ``shape``: of the ``block`` (rows × columns)
    it lies in, the last blocks of a row or column ragged. No ``block``: one scale per row
    for a (rows, 1) scale, else one for the whole matrix."""
    m, n = shape
    if block is None:
        block = (1, n) if scale.numel() == m > 1 else (m, n)
    b0, b1 = block
    grid = scale.float().reshape(-(-m // b0), -(-n // b1))
    return grid.repeat_interleave(b0, dim=0)[:m].repeat_interleave(b1, dim=1)[:, :n]


def reference_dequantize(
    fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None
) -> torch.Tensor:
    """The definition: each FP8 value times the scale of its block, in float32."""
    return fp8.float() * expand(scale, fp8.shape, block)


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read by safetensors."""
    state = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            state.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return state


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA whose MLP (200 × 32) is cut into ragged blocks by 16 × 24 and 128 × 128."""
    out = tmp_path_factory.mktemp("quantized") / "base"
    return producers.llama(out, dtype=torch.bfloat16, intermediate_size=200)


@pytest.mark.parametrize(
    ("block", "dtype"),
    [((128, 128), torch.float8_e4m3fn), ((16, 24), torch.float8_e4m3fn),
     ((16, 24), torch.float8_e5m2), (None, torch.float8_e4m3fn)],
)  # fmt: skip
def test_fp8_with_scales_dequantizes_to_the_reference(
    bf16_llama: Path, tmp_path: Path, block: tuple[int, int] | None, dtype: torch.dtype
) -> None:
    """Block scales (DeepSeek-V3's weight_scale_inv, ragged edges included) and a per-tensor
    scale (compressed-tensors' weight_scale), in a sharded checkpoint: every FP8 weight read
    equals the reference bit for bit, and lies within FP8's rounding of the bf16 original."""
    folder = producers.fp8_checkpoint(bf16_llama, tmp_path / "fp8", block=block, dtype=dtype)
    stored, original = _stored(folder), _stored(bf16_llama)
    suffix = "_scale_inv" if block else "_scale"
    fp8_names = [n for n, t in stored.items() if t.dtype == dtype]
    assert len(fp8_names) == 28  # 4 blocks × 7 linear layers
    # FP8's rounding: half a unit in the last place relative to the value (3 or 2 mantissa
    # bits), and half the smallest subnormal of the block's scale near zero.
    relative, subnormal = (
        (2.0**-4, 2.0**-10) if dtype == torch.float8_e4m3fn else (2.0**-3, 2.0**-17)
    )
    with Checkpoint.open(folder) as checkpoint:
        assert len(checkpoint.files) > 1
        for name in fp8_names:
            expected = reference_dequantize(stored[name], stored[name + suffix], block)
            got = checkpoint.read(name)
            assert got.dtype == torch.float32
            assert torch.equal(got, expected), name
            weight = original[name].float()
            bound = relative * weight.abs() + subnormal * expand(
                stored[name + suffix], got.shape, block
            )
            assert bool(((got - weight).abs() <= bound).all()), name
            assert skip_reason(checkpoint.tensors[name + suffix]) == f"FP8 scale of {name}"
        scheme = f"{block[0]}×{block[1]} block scales" if block else "a per-tensor scale"
        fmt = "F8_E4M3" if dtype == torch.float8_e4m3fn else "F8_E5M2"
        assert checkpoint.selection_note == (
            f"dequantized from FP8 to float32 as read: 28 {fmt} tensors × {scheme} (weight{suffix})"
        )


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_dequantizes_as_transformers_own_dequantizer_does(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """The producer's side: transformers loads the same FP8 checkpoint with
    ``FineGrainedFP8Config(dequantize=True)`` into float32 (its dequantizer runs on the CPU;
    it needs blocks that divide the weight, so 16 × 16 here), and every weight it builds
    equals dynaudit's read, bit for bit."""
    from transformers import FineGrainedFP8Config, LlamaForCausalLM

    base = producers.llama(tmp_path / "base", dtype=torch.bfloat16, intermediate_size=192)
    folder = producers.fp8_checkpoint(base, tmp_path / "fp8", block=(16, 16), dtype=dtype)
    try:
        config = FineGrainedFP8Config(dequantize=True)
    except TypeError:
        pytest.skip("this transformers has no FP8 dequantization")
    model = LlamaForCausalLM.from_pretrained(
        folder, quantization_config=config, dtype=torch.float32
    )
    theirs = model.state_dict()
    with Checkpoint.open(folder) as checkpoint:
        fp8 = [n for n, info in checkpoint.tensors.items() if info.dtype.startswith("F8_")]
        assert len(fp8) == 28
        for name in fp8:
            assert torch.equal(checkpoint.read(name), theirs[name]), name


def test_per_row_bf16_scales_and_activation_scales(tmp_path: Path) -> None:
    """FBGEMM / compressed-tensors channel scales: one bf16 scale per output row, shape
    (rows, 1), and a static input_scale beside it, which is not a layer either."""
    torch.manual_seed(0)
    weight = torch.randn(48, 32)
    scale = (weight.abs().amax(dim=1, keepdim=True) / 448).to(torch.bfloat16)
    fp8 = (weight / scale.float()).to(torch.float8_e4m3fn)
    save_file(
        {"proj.weight": fp8, "proj.weight_scale": scale, "proj.input_scale": torch.ones(1)},
        str(tmp_path / "model.safetensors"),
    )
    with Checkpoint.open(tmp_path / "model.safetensors") as checkpoint:
        assert torch.equal(checkpoint.read("proj.weight"), reference_dequantize(fp8, scale))
        assert skip_reason(checkpoint.tensors["proj.input_scale"]) == (
            "FP8 activation scale of proj"
        )
        assert checkpoint.selection_note is not None
        assert "1 F8_E4M3 tensor × per-row scales (weight_scale)" in checkpoint.selection_note


def test_measure_of_a_block_fp8_checkpoint_says_dequantized(
    bf16_llama: Path, tmp_path: Path
) -> None:
    """measure audits the same layers as the bf16 model, skips the scales with their reason,
    says the weights were dequantized, and each layer's digest is that of the dequantized
    float32 values (a float32 copy of them has the same digests)."""
    folder = producers.fp8_checkpoint(bf16_llama, tmp_path / "fp8", block=(16, 24))
    settings = small_settings()
    report = dynaudit.measure(folder, cache=False, **settings)
    plain = dynaudit.measure(bf16_llama, cache=False, **settings)
    assert [x.name for x in report.measured] == [x.name for x in plain.measured]
    assert report.source.selection is not None
    assert report.source.selection.startswith("dequantized from FP8 to float32 as read: 28")
    reasons = {x.name: x.skipped for x in report.skipped}
    scale = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    assert reasons[scale] == "FP8 scale of model.layers.0.self_attn.q_proj.weight"

    stored = _stored(folder)
    dequantized = {
        name: reference_dequantize(tensor, stored[name + "_scale_inv"], (16, 24))
        if tensor.dtype == torch.float8_e4m3fn
        else tensor
        for name, tensor in stored.items()
        if not name.endswith("_scale_inv")
    }
    copy = tmp_path / "float32"
    copy.mkdir()
    save_file(dequantized, str(copy / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (copy / "config.json").write_text(json.dumps(config))
    floats = dynaudit.measure(copy, cache=False, **settings)
    assert [x.digest for x in report.measured] == [x.digest for x in floats.measured]
    assert [x.discrepancy for x in report.measured] == [x.discrepancy for x in floats.measured]


def test_measure_from_the_command_line_prints_the_dequantization(
    bf16_llama: Path, tmp_path: Path
) -> None:
    folder = producers.fp8_checkpoint(bf16_llama, tmp_path / "fp8")
    args = ["--q-dim", "16", "--pieces", "4", "--steps", "30", "--no-cache"]
    result = run_cli("measure", str(folder), *args, env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "weights: dequantized from FP8 to float32 as read" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    ("scale_shape", "message"),
    [((3, 5), "fits neither a per-tensor, a per-row nor a block scale"),
     ("fp8", "is itself F8_E4M3")],
)  # fmt: skip
def test_an_fp8_scale_that_cannot_be_placed_is_refused(
    tmp_path: Path, scale_shape: tuple[int, int] | str, message: str
) -> None:
    weight = torch.randn(40, 24).to(torch.float8_e4m3fn)
    scale = (
        torch.ones(1).to(torch.float8_e4m3fn) if scale_shape == "fp8" else torch.ones(scale_shape)
    )
    save_file({"p.weight": weight, "p.weight_scale_inv": scale}, str(tmp_path / "m.safetensors"))
    with pytest.raises(QuantizedRefused, match=message):
        Checkpoint.open(tmp_path / "m.safetensors")


# ── GPTQ, AWQ, bitsandbytes: refused ─────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def llama_for_int4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int4") / "base"
    return producers.llama(out, dtype=torch.float16, intermediate_size=64, shards=False)


@pytest.mark.parametrize(
    ("kind", "scheme", "how"),
    [("gptq", "GPTQ weights", "dequantize it with the library that made it"),
     ("awq", "AWQ weights", "dequantize it with the library that made it"),
     ("nf4", "bitsandbytes weights", "call model.dequantize()"),
     ("int8", "bitsandbytes weights", "call model.dequantize()")],
)  # fmt: skip
@pytest.mark.parametrize("command", ["measure", "inspect"])
def test_gptq_awq_and_bitsandbytes_are_refused_in_one_line(
    llama_for_int4: Path, tmp_path: Path, kind: str, scheme: str, how: str, command: str
) -> None:
    if kind in ("gptq", "awq"):
        folder = producers.gptq_checkpoint(llama_for_int4, tmp_path / kind, method=kind)
    else:
        folder = producers.bnb_checkpoint(
            llama_for_int4, tmp_path / kind, bits=4 + 4 * (kind == "int8")
        )
    result = run_cli(command, str(folder))
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"dynaudit: error: {folder}: {scheme} ")
    assert "audit the unquantized model they were made from" in lines[0]
    assert how in lines[0]


def test_packed_int4_is_refused_from_its_tensor_names_alone(
    llama_for_int4: Path, tmp_path: Path
) -> None:
    """Without quantization_config (config.json lost or rewritten), the names still tell."""
    folder = producers.gptq_checkpoint(llama_for_int4, tmp_path / "gptq")
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizedRefused, match=r"GPTQ/AWQ packed int4 weights \(tensors .*qweight"):
        Checkpoint.open(folder)
    single = tmp_path / "model.safetensors"
    save_file(
        {"w.weight": torch.zeros(8, 8, dtype=torch.int8), "w.SCB": torch.ones(8)}, str(single)
    )
    with pytest.raises(QuantizedRefused, match="bitsandbytes int8 weights"):
        Checkpoint.open(single)


@pytest.mark.parametrize(
    ("tensors", "scheme"),
    [({"w.weight": torch.zeros(8, 8, dtype=torch.int8), "w.weight_scale": torch.ones(8, 1)},
      "integer weights with scales"),
     ({"w.weight_packed": torch.zeros(8, 1, dtype=torch.int32)},
      "compressed-tensors packed integer")],
)  # fmt: skip
def test_other_quantized_layouts_are_refused(
    tmp_path: Path, tensors: dict[str, torch.Tensor], scheme: str
) -> None:
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with pytest.raises(QuantizedRefused, match=scheme):
        Checkpoint.open(tmp_path / "m.safetensors")


@pytest.mark.parametrize(
    ("dtype", "scheme"), [("F4", r"packed FP4 \(MXFP4/NVFP4\)"), ("F8_E8M0", "MX block-scaled")]
)
def test_packed_fp4_and_mx_scales_are_refused(tmp_path: Path, dtype: str, scheme: str) -> None:
    path = _raw_file(
        tmp_path / "m.safetensors", {"w.weight": (dtype, [8, 4], 32 * DTYPE_BITS[dtype] // 8)}
    )
    with pytest.raises(QuantizedRefused, match=scheme):
        Checkpoint.open(path)


def test_a_config_naming_another_quantization_method_is_refused(tmp_path: Path) -> None:
    save_file({"w.weight": torch.randn(8, 8)}, str(tmp_path / "model.safetensors"))
    config = {"model_type": "llama", "quantization_config": {"quant_method": "hqq"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizedRefused, match=r"HQQ weights .*quant_method 'hqq'"):
        Checkpoint.open(tmp_path)


def test_a_lora_adapter_over_an_fp8_base_merges_over_the_dequantized_weights(
    tmp_path: Path,
) -> None:
    """The adapter's checkpoint is built from its base's tensors and config: the FP8 base's
    weights come dequantized, the adapter's update is added to them, the scales stay skipped."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from dynaudit.sources import open_adapter

    base = producers.llama(tmp_path / "base", dtype=torch.float32, shards=False)
    fp8 = producers.fp8_checkpoint(base, tmp_path / "fp8", block=(16, 16))
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"])
    get_peft_model(LlamaForCausalLM.from_pretrained(base), lora).save_pretrained(
        tmp_path / "adapter"
    )
    name = "model.layers.1.self_attn.q_proj.weight"
    with (
        open_adapter(tmp_path / "adapter", base=fp8) as merged,
        open_adapter(tmp_path / "adapter", base=base) as plain,
        Checkpoint.open(fp8) as quantized,
        Checkpoint.open(base) as original,
    ):
        update = plain.read(name) - original.read(name)
        assert update.abs().max() > 0
        torch.testing.assert_close(merged.read(name), quantized.read(name) + update)
        assert merged.selection_note == quantized.selection_note
        assert skip_reason(merged.tensors[name + "_scale_inv"]) == f"FP8 scale of {name}"


@pytest.mark.slow
def test_quantisation_calibration_quick(tmp_path: Path) -> None:
    """``python -m experiments.quantisation --quick``: against a bf16 base, FP8 (block and
    per-tensor scales, E4M3 and E5M2), int8 and int4 (per row, per group, with and without a
    zero point) round trips pass, and so does a fine-tune shipped as FP8; int3 fails as
    noise-like damage (docs/gate.md, "Quantised weights")."""
    from tests.test_experiments import run_quick

    result = run_quick("quantisation", tmp_path)
    rows = {row["case"]: row for row in result["rows"]}
    assert rows["int3 per row"]["verdict"] == "fail"
    assert all(row["verdict"] == "pass" for case, row in rows.items() if case != "int3 per row")
    fp8 = rows["FP8 E4M3, 128×128 block scales"]
    assert fp8["weights"].startswith("dequantized from FP8 to float32 as read")
    assert fp8["max_weight_change"] < 0.05
