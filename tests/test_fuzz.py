"""Fuzzing of everything dynaudit parses itself: safetensors headers, shard indexes, baseline
directories and policy files. Whatever the bytes, the result is the parsed value or one of
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
from dynaudit.comparison import BASELINE_FILE, MANIFEST_FILE, BaselineError, load_baseline
from dynaudit.errors import CorruptCheckpoint, DynauditError, UsageError
from dynaudit.policy import Policy, load_policy
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
