"""Fuzzing of everything dynaudit parses itself: safetensors headers, shard indexes, baseline
directories (baseline.json, the manifest, the coordinate files and the paths naming them) and
policy files. Whatever the bytes, the result is the parsed value or one of
dynaudit's input/usage errors (exit 3 or 2), never another exception (exit 4, a traceback).

Bounded: a fixed number of examples per target (derandomised under CI=true, so CI is
reproducible; random locally, so runs on developer machines keep exploring).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynaudit
from dynaudit.baseline_store import (
    BASELINE_FILE,
    MANIFEST_FILE,
    expected_coords,
    load_baseline,
    read_coords,
)
from dynaudit.errors import BaselineError, CorruptCheckpoint, DynauditError, UsageError
from dynaudit.gate import load_policy
from dynaudit.schema import Policy
from dynaudit.tensors import parse_header, read_header, read_index

CI = bool(os.environ.get("CI"))
FUZZ = settings(
    max_examples=200, deadline=None, derandomize=CI, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

# Payloads that once slipped past JSON error handling elsewhere: deep nesting (RecursionError)
# and integers beyond Python's digit limit (a plain ValueError).
HOSTILE_JSON = [b"[" * 100_000, b'{"a": ' + b"1" * 5000 + b"}", b'{"a": 1e999999}', b"\xff\xfe"]

dtypes = st.sampled_from(["F32", "BF16", "F16", "F64", "I64", "U8", "BOOL", "C64", "f32", ""])
entries = st.fixed_dictionaries(
    {
        "dtype": dtypes | json_values,
        "shape": st.lists(st.integers(-2, 2**40) | st.sampled_from([0, 1, 2, 3, 4]), max_size=3)
        | json_values,
        "data_offsets": st.lists(st.integers(-8, 300), max_size=3) | json_values,
    }
)
headers = st.dictionaries(st.text(max_size=10), entries | json_values, max_size=5)


def _file(header: bytes, data: bytes, claimed: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if claimed is None else claimed) + header + data


def _assert_valid(tensors: dict[str, Any], size: int) -> None:
    """What a parsed header promises: every tensor inside the file, none overlapping."""
    spans = sorted((t.start, t.start + t.nbytes) for t in tensors.values() if t.nbytes)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start
    assert all(end <= size for _, end in spans)


@FUZZ
@given(header=headers, data=st.binary(max_size=300))
def test_structured_safetensors_headers(header: dict[str, Any], data: bytes) -> None:
    raw = _file(json.dumps(header).encode(), data)
    try:
        tensors, _ = parse_header(Path("x.safetensors"), len(raw), lambda o, n: raw[o : o + n])
    except CorruptCheckpoint:
        return
    _assert_valid(tensors, len(raw))


@FUZZ
@given(
    header=st.binary(max_size=200) | st.sampled_from(HOSTILE_JSON),
    data=st.binary(max_size=64),
    claimed=st.none() | st.integers(0, 2**64 - 1),
)
def test_arbitrary_header_bytes(header: bytes, data: bytes, claimed: int | None) -> None:
    raw = _file(header, data, claimed)[: None if claimed is None else 8 + len(header) + len(data)]
    try:
        tensors, _ = parse_header(Path("x.safetensors"), len(raw), lambda o, n: raw[o : o + n])
    except CorruptCheckpoint:
        return
    _assert_valid(tensors, len(raw))


@pytest.mark.parametrize("header", HOSTILE_JSON)
def test_hostile_json_in_a_file_on_disk(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(_file(header, b""))
    with pytest.raises(CorruptCheckpoint):
        read_header(path)


@FUZZ
@given(
    index=json_values
    | st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=12), json_values)})
    | st.sampled_from(HOSTILE_JSON),
)
def test_shard_indexes(tmp_path: Path, index: Any) -> None:
    path = tmp_path / "model.safetensors.index.json"
    path.write_bytes(index if isinstance(index, bytes) else json.dumps(index).encode())
    try:
        names, _ = read_index(path)
    except CorruptCheckpoint:
        return
    assert all((tmp_path / name).parent == tmp_path for name in names)  # never outside


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import save_file
    from torch import randn

    root = tmp_path_factory.mktemp("fuzz-baseline")
    save_file({"a.weight": randn(12, 10), "b.weight": randn(6, 12)}, str(root / "m.safetensors"))
    out = root / "baseline"
    dynaudit.baseline(root / "m.safetensors", out, q_dim=8, pieces=2, steps=5, seeds=2)
    return out


def _rewrite(directory: Path, name: str, content: bytes) -> None:
    """Replace one file of a baseline and re-sign the manifest, so that parsing (not the
    sha256 check) meets the content."""
    (directory / name).write_bytes(content)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest[name] = hashlib.sha256(content).hexdigest()
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


@FUZZ
@given(
    edit=st.sampled_from(["replace", "flip", "manifest"]),
    value=json_values | st.sampled_from(HOSTILE_JSON),
    position=st.floats(0, 1, exclude_max=True),
)
def test_baselines(baseline_dir: Path, tmp_path_factory: pytest.TempPathFactory, edit: str,
                   value: Any, position: float) -> None:  # fmt: skip
    import shutil

    work = tmp_path_factory.mktemp("fuzzed") / "baseline"
    shutil.copytree(baseline_dir, work)
    content = value if isinstance(value, bytes) else json.dumps(value).encode()
    if edit == "replace":
        _rewrite(work, BASELINE_FILE, content)
    elif edit == "flip":
        raw = bytearray((work / BASELINE_FILE).read_bytes())
        raw[int(position * len(raw))] ^= 0x20
        _rewrite(work, BASELINE_FILE, bytes(raw))
    else:
        (work / MANIFEST_FILE).write_bytes(content)
    with contextlib.suppress(BaselineError):
        load_baseline(work)


def _fitted(directory: Path) -> dict[str, str]:
    """Coordinate file by layer name, from baseline.json."""
    data = json.loads((directory / BASELINE_FILE).read_text())
    return {x["name"]: x["coords"] for x in data["layers"] if x["coords"]}


def _load_all(directory: Path) -> dict[str, dict[str, Any]]:
    """Load a baseline and read every layer's coordinates, as ``check`` would."""
    baseline = load_baseline(directory)
    fit = baseline.fit_settings()
    out = {}
    for layer in baseline.layers:
        if layer.coords is None:
            continue
        tensors = read_coords(directory, baseline, layer)
        expected = expected_coords(layer, baseline.seeds, fit)
        # What a loaded baseline promises compare_plan: its tensors, shapes, float32, finite.
        assert {f"cold.{k}" for k in range(baseline.seeds)} <= set(tensors) <= set(expected)
        for name, tensor in tensors.items():
            assert tuple(tensor.shape) == expected[name] and str(tensor.dtype) == "torch.float32"
            assert bool(tensor.isfinite().all())
        out[layer.name] = tensors
    return out


TENSOR_NAMES = ["cold.0", "cold.1", "null.0", "null.1", "cold.2", "null.2", "sketch", "x", ""]
FILLS = ["normal", "nan", "inf", "zero"]
coords_edits = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("bytes"), st.binary(max_size=300) | st.sampled_from(HOSTILE_JSON)),
    st.tuples(
        st.just("tensor"),
        st.sampled_from(TENSOR_NAMES),
        st.none() | st.lists(st.integers(0, 5), max_size=5),  # None: the stored shape
        st.sampled_from(["float32", "float64", "float16", "int64", "bool"]),
        st.sampled_from(FILLS),
    ),
    st.tuples(st.just("drop"), st.sampled_from(TENSOR_NAMES)),
    st.tuples(st.just("metadata"), st.none() | st.text(max_size=12)),
)


def _edit_coords(file: Path, edit: tuple[Any, ...]) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    raw = file.read_bytes()
    kind = edit[0]
    if kind == "flip":
        data = bytearray(raw)
        data[int(edit[1] * len(data))] ^= edit[2]
        file.write_bytes(bytes(data))
        return
    if kind == "truncate":
        file.write_bytes(raw[: int(edit[1] * len(raw))])
        return
    if kind == "bytes":
        file.write_bytes(edit[1])
        return
    from dynaudit.tensors import read_header

    _, metadata = read_header(file)
    tensors = load_file(str(file))
    if kind == "tensor":
        _, name, shape, dtype, fill = edit
        if shape is None:
            shape = list(tensors[name].shape) if name in tensors else [1]
        value = torch.randn(shape) if fill == "normal" else torch.zeros(shape)
        if fill in ("nan", "inf") and value.numel():
            value.view(-1)[value.numel() // 2] = float(fill)
        tensors[name] = value.to(getattr(torch, dtype))
    elif kind == "drop":
        tensors.pop(edit[1], None)
    else:
        metadata = {} if edit[1] is None else {"dynaudit.layer": edit[1]}
    save_file(tensors, str(file), metadata=metadata or None)


@FUZZ
@given(
    which=st.integers(0, 1),
    edit=coords_edits,
    signed=st.booleans(),
)
def test_baseline_coordinate_files(
    baseline_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    which: int,
    edit: tuple[Any, ...],
    signed: bool,
) -> None:
    """A coordinate file mutated (and re-signed in the manifest, or not): the baseline loads
    with every promise kept, identically when the bytes are unchanged, or is a BaselineError."""
    import shutil

    work = tmp_path_factory.mktemp("fuzzed") / "baseline"
    shutil.copytree(baseline_dir, work)
    name = sorted(_fitted(work).values())[which]
    before = (work / name).read_bytes()
    _edit_coords(work / name, edit)
    if signed:
        _rewrite(work, name, (work / name).read_bytes())
    try:
        loaded = _load_all(work)
    except BaselineError:
        return
    assert signed or (work / name).read_bytes() == before  # unsigned changes never load
    if (work / name).read_bytes() == before:
        original = _load_all(baseline_dir)
        assert loaded.keys() == original.keys()
        for layer, tensors in original.items():
            assert all(tensors[k].equal(loaded[layer][k]) for k in tensors)


coords_paths = st.one_of(
    st.sampled_from([
        "../baseline/coords/00000.safetensors", "/etc/passwd", "../../../../etc/passwd",
        "coords", "coords/", "./coords/00000.safetensors", "coords//00000.safetensors",
        "coords/00000.safetensors/", "coords/00001.safetensors",
        "coords/../coords/00000.safetensors",
        "baseline.json", "manifest.json", ".", "", "coords\\00000.safetensors", "C:/x",
        "coords/00000.safetensors\x00", "link.safetensors", "loop.safetensors", "fifo",
    ]),
    st.text(max_size=30),
    st.none(),
)  # fmt: skip


@FUZZ
@given(path=coords_paths, layer=st.integers(0, 1), listed=st.booleans())
def test_baseline_coords_paths(
    baseline_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    path: str | None,
    layer: int,
    listed: bool,
) -> None:
    """``layers[].coords`` rewritten to any path, added to the manifest or not, with links
    leading outside, looping, and a FIFO beside it: the baseline loads identically (the path
    is the one written, or a layer is left unfitted) or is a BaselineError, never a hang."""
    import shutil

    work = tmp_path_factory.mktemp("fuzzed") / "baseline"
    shutil.copytree(baseline_dir, work)
    outside = work.parent / "outside.safetensors"
    shutil.copy(work / sorted(_fitted(work).values())[layer], outside)
    (work / "link.safetensors").symlink_to(outside)
    (work / "loop.safetensors").symlink_to(work / "loop.safetensors")
    if hasattr(os, "mkfifo"):
        os.mkfifo(work / "fifo")
    data = json.loads((work / BASELINE_FILE).read_text())
    fitted = [x for x in data["layers"] if x["coords"]]
    original = fitted[layer]["coords"]
    fitted[layer]["coords"] = path
    _rewrite(work, BASELINE_FILE, json.dumps(data).encode())
    if listed and path is not None:
        manifest = json.loads((work / MANIFEST_FILE).read_text())
        manifest[path] = hashlib.sha256(b"").hexdigest()
        with contextlib.suppress(OSError, ValueError):
            if (work / path).is_file() and (work / path).resolve().is_relative_to(work):
                manifest[path] = hashlib.sha256((work / path).read_bytes()).hexdigest()
        (work / MANIFEST_FILE).write_text(json.dumps(manifest))
    try:
        loaded = _load_all(work)
    except BaselineError:
        return
    assert path in (original, None), path
    expected = _load_all(baseline_dir)
    if path is None:
        expected.pop(fitted[layer]["name"])
    assert loaded.keys() == expected.keys()


POLICY_KEYS = [*Policy.model_fields, "tool", "dynaudit", "policy", "x"]
TOML_VALUES = ["1", "-1", "0.5", "1e400", "-inf", "nan", '"2"', "[1, 2]", "{ a = 1 }", "true", ""]
SECTIONS = ["", "[tool]", "[tool.dynaudit]", "[tool.dynaudit.policy]", "[[tool.dynaudit]]"]


@FUZZ
@given(
    lines=st.lists(
        st.tuples(st.sampled_from(SECTIONS), st.sampled_from(POLICY_KEYS),
                  st.sampled_from(TOML_VALUES)),
        max_size=5,
    ),
    noise=st.text(max_size=20),
)  # fmt: skip
def test_policy_files(tmp_path: Path, lines: list[tuple[str, str, str]], noise: str) -> None:
    text = "\n".join(f"{section}\n{key} = {value}" for section, key, value in lines) + noise
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    for where in (path, None):  # as --policy, and as ./pyproject.toml
        if where is None:
            (tmp_path / "pyproject.toml").write_bytes(path.read_bytes())
        try:
            policy = load_policy(where) if where else _in(tmp_path, load_policy)
        except UsageError:
            continue
        assert isinstance(policy, Policy)


def _in(directory: Path, call: Any) -> Any:
    previous = Path.cwd()
    os.chdir(directory)
    try:
        return call()
    finally:
        os.chdir(previous)


def test_errors_raised_here_are_input_or_usage_errors() -> None:
    assert issubclass(CorruptCheckpoint, DynauditError) and CorruptCheckpoint("x").exit_code == 3
    assert BaselineError("x").exit_code == 3 and UsageError("x").exit_code == 2
