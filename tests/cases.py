"""The command line's input-error cases, in one table for the tests and the reliability suite.

Each case is an input a user can meet (a broken checkpoint, a damaged baseline) and the answer
the command line owes: the documented exit code and one ``dynaudit: error:`` line naming what
is wrong, where, and what to do. ``tests/test_cases.py`` runs every case in-process;
``bench/reliability/inputs.py`` builds its "inputs" table rows from the same cases (with its
own workspace, timing and report guards), so a case is written once.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.producers import raw_safetensors, sharded_index

__all__ = [
    "BAD_CHECKPOINTS",
    "BROKEN_BASELINES",
    "BadCheckpoint",
    "BrokenBaseline",
    "rehash_manifest",
]


@dataclass(frozen=True)
class BadCheckpoint:
    """``dynaudit measure`` of what ``make(folder)`` writes into an empty ``folder`` (it
    returns the source to name): exit ``code``, one line holding every needle
    (case-insensitive; ``{source}`` stands for that source)."""

    name: str
    make: Callable[[Path], Path]
    needles: tuple[str, ...]
    code: int = 3

    def expected(self, source: Path) -> list[str]:
        return [str(source) if needle == "{source}" else needle for needle in self.needles]


@dataclass(frozen=True)
class BrokenBaseline:
    """``dynaudit check`` against a copy of a good baseline that ``damage(copy)`` broke (it
    returns the file it broke): exit 3, one line naming that file and every needle."""

    name: str
    damage: Callable[[Path], str]
    needles: tuple[str, ...]


# -- broken checkpoints -----------------------------------------------------------------


def _matrix(folder: Path, name: str = "model.safetensors") -> Path:
    path = folder / name
    save_file({"fc1.weight": torch.randn(64, 32), "fc2.weight": torch.randn(16, 64)}, str(path))
    return path


def _truncated(folder: Path) -> Path:
    path = _matrix(folder)
    path.write_bytes(path.read_bytes()[:-1000])
    return path


def _huge_header(folder: Path) -> Path:
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b'{"w": {}}' + b"\0" * 64)
    return path


def _header(entries: dict[str, object], data: bytes) -> Callable[[Path], Path]:
    return lambda folder: raw_safetensors(folder / "model.safetensors", entries, data)


def _f32(shape: list[int], begin: int, end: int, dtype: str = "F32") -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _index(weight_map: dict[str, str], outside: bool = False) -> Callable[[Path], Path]:
    """tests/test_tensors.py's sharded directory (one shard, tensor "a") with ``weight_map``;
    ``outside``: a real safetensors file beside the directory, where ``../`` would lead."""

    def make(folder: Path) -> Path:
        if outside:
            save_file({"b": torch.randn(8, 8)}, str(folder / "outside.safetensors"))
        return sharded_index(folder, weight_map)

    return make


def _only_vectors(folder: Path) -> Path:
    vectors = {
        "scale": torch.tensor(2.0),
        "fc.bias": torch.randn(8),
        "norm.weight": torch.ones(8),
        "step": torch.tensor(7),
    }
    save_file(vectors, str(folder / "model.safetensors"))
    return folder


def _pickle_alone(folder: Path) -> Path:
    torch.save({"fc.weight": torch.randn(8, 8)}, folder / "pytorch_model.bin")
    return folder


def _two_shards() -> dict[str, str]:
    return {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}


BAD_CHECKPOINTS = [
    BadCheckpoint("truncated .safetensors", _truncated, ("{source}", "truncated", "re-download")),
    BadCheckpoint(
        "8-byte header length 2**62", _huge_header, ("{source}", "header claims", "re-download")
    ),
    BadCheckpoint(
        "overlapping data offsets",
        _header({"a": _f32([4, 4], 0, 64), "b": _f32([4, 4], 32, 96)}, b"\0" * 96),
        ("{source}", "overlap", "re-download"),
    ),
    BadCheckpoint(
        "data offsets past the end",
        _header({"w": _f32([4, 4], 0, 64)}, b"\0" * 16),
        ("{source}", "outside", "re-download"),
    ),
    BadCheckpoint(
        "index names a missing shard",
        _index(_two_shards()),
        ("model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing"),
    ),
    BadCheckpoint(
        "index shard ../outside.safetensors",
        _index({"a": "../outside.safetensors"}, outside=True),
        ("model.safetensors.index.json", "../outside.safetensors", "outside the checkpoint"),
    ),
    BadCheckpoint(
        "index shard /etc/passwd",
        _index({"a": "/etc/passwd"}),
        ("model.safetensors.index.json", "/etc/passwd", "outside the checkpoint"),
    ),
    BadCheckpoint(
        "empty directory", lambda folder: folder, ("{source}", "no .safetensors", "point at")
    ),
    BadCheckpoint(
        "only 0-d and 1-d tensors", _only_vectors, ("{source}", "no weight matrix to audit")
    ),
    BadCheckpoint(
        "only a complex (C64) weight",
        _header({"w": _f32([2, 2], 0, 32, "C64")}, b"\0" * 32),
        ("{source}", "no weight matrix to audit", "'w' (non-float dtype C64)"),
    ),
    BadCheckpoint(
        "dtype 'float32!'",
        _header({"w": _f32([2, 2], 0, 16, "float32!")}, b"\0" * 16),
        ("{source}", "'w'", "dtype 'float32!'"),
    ),
    BadCheckpoint(
        "shape [2**40, 2**40] over 64 bytes",
        _header({"w": _f32([2**40, 2**40], 0, 64)}, b"\0" * 64),
        ("{source}", "'w'", "needs", "re-download"),
    ),
    BadCheckpoint(
        "pytorch_model.bin alone", _pickle_alone, ("pytorch_model.bin", "pickle", "--allow-pickle")
    ),
]


# -- broken baselines -------------------------------------------------------------------


def rehash_manifest(copy: Path) -> None:
    """Rewrite a baseline's manifest to match its files (a damage that hides itself)."""
    from dynaudit.tensors import sha256_file

    manifest = copy / "manifest.json"
    entries = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({k: sha256_file(copy / k) for k in entries}, indent=1))


def _break_report(copy: Path) -> str:
    path = copy / "baseline.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "baseline.json"


def _break_report_rehashed(copy: Path) -> str:
    path = copy / "baseline.json"
    path.write_text(path.read_text().replace('"layers"', '"layerz"', 1))
    rehash_manifest(copy)
    return "baseline.json"


def _break_manifest(copy: Path) -> str:
    (copy / "manifest.json").write_text('{"baseline.json": ')
    return "manifest.json"


def _coords_file(copy: Path) -> Path:
    return sorted((copy / "coords").glob("*.safetensors"))[0]


def _flip_coords_byte(copy: Path) -> str:
    path = _coords_file(copy)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a coordinate's low bits: still a valid file, silently other numbers
    path.write_bytes(bytes(data))
    return path.name


def _scale_coords(copy: Path) -> str:
    path = _coords_file(copy)
    tensors = load_file(str(path))
    save_file({k: v * 1.01 for k, v in tensors.items()}, str(path))
    return path.name


BROKEN_BASELINES = [
    BrokenBaseline("baseline.json truncated", _break_report, ("sha256", "re-create")),
    BrokenBaseline(
        "baseline.json invalid, manifest re-hashed",
        _break_report_rehashed,
        ("not a valid baseline",),
    ),
    BrokenBaseline("manifest.json truncated", _break_manifest, ("manifest",)),
    BrokenBaseline("coordinates: one byte flipped", _flip_coords_byte, ("sha256", "re-create")),
    BrokenBaseline("coordinates: values scaled 1 %", _scale_coords, ("sha256", "re-create")),
]
