"""Streaming access to safetensors checkpoints.

Only headers are parsed up front (names, dtypes, shapes, offsets), and validated strictly:
a malformed file is a :class:`~dynaudit.errors.CorruptCheckpoint`, never a crash later. Tensor
data is read one tensor at a time through a private copy-on-write memory map, so the raw bytes
stay file-backed page cache and only the float32 copy the fit needs is anonymous memory.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynaudit.errors import CheckpointNotFound, CorruptCheckpoint, EmptyCheckpoint, PickleRefused

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

__all__ = [
    "Checkpoint",
    "TensorInfo",
    "natural_key",
    "parse_header",
    "read_index",
    "sha256_file",
]

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# safetensors' own reader refuses headers above 100 MB; so do we, before allocating anything.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024 * 1024

ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key comparing digit runs as numbers, so ``layers.2`` comes before ``layers.10``.
    ``isdecimal``, not ``isdigit``: the runs ``\\d`` splits off are decimal digits, while
    ``isdigit`` also accepts ``¹`` or ``②``, which ``int`` refuses."""
    return tuple(
        (0, int(part)) if part.isdecimal() else (1, part)
        for part in re.split(r"(\d+)", name)
        if part
    )


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the header alone."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in ``file``
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one local ``.safetensors`` header; returns (tensors, metadata)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:

            def read(offset: int, length: int) -> bytes:
                fh.seek(offset)
                return fh.read(length)

            return parse_header(path, size, read)
    except OSError as exc:
        raise CorruptCheckpoint(f"{path}: cannot read ({exc.strerror})", path=str(path)) from exc


def parse_header(
    path: Path, size: int, read: Callable[[int, int], bytes]
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header from ``read(offset, length)`` over a file of
    ``size`` bytes (local or remote); offsets are checked against ``size``."""
    prefix = read(0, 8) if size >= 8 else b""
    if len(prefix) < 8:
        raise CorruptCheckpoint(
            f"{path}: not a safetensors file (only {size} bytes)", path=str(path)
        )
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise CorruptCheckpoint(
            f"{path}: not a safetensors file or truncated "
            f"(header claims {header_len} bytes, file has {size})",
            path=str(path),
        )
    raw = read(8, header_len)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # also deep nesting and over-long integers
        raise CorruptCheckpoint(
            f"{path}: not a safetensors file (header is not JSON)", path=str(path)
        ) from exc
    if not isinstance(header, dict):
        raise CorruptCheckpoint(f"{path}: safetensors header is not an object", path=str(path))
    data_start = 8 + header_len
    data_size = size - data_start
    metadata_raw = header.pop("__metadata__", None) or {}
    metadata = (
        {str(k): str(v) for k, v in metadata_raw.items()} if isinstance(metadata_raw, dict) else {}
    )
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, data_size)
    _check_no_overlap(path, tensors.values(), data_start)
    return tensors, metadata


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    def bad(problem: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"{path}: tensor {name!r}: {problem}", path=str(path))

    if not isinstance(entry, dict):
        raise bad("header entry is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad(f"invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise bad(f"invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise bad(f"data_offsets {offsets} outside the file's {data_size} data bytes (truncated?)")
    numel = 1
    for dim in shape:
        numel *= dim
    if numel * ITEMSIZE[dtype] != end - begin:
        raise bad(
            f"shape {shape} as {dtype} needs {numel * ITEMSIZE[dtype]} bytes, "
            f"offsets give {end - begin}"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)


def _check_no_overlap(path: Path, infos: Any, data_start: int) -> None:
    last_end, last_name = data_start, None
    for info in sorted(infos, key=lambda t: (t.start, t.nbytes)):
        if info.nbytes and info.start < last_end:
            raise CorruptCheckpoint(
                f"{path}: tensors {last_name!r} and {info.name!r} overlap", path=str(path)
            )
        if info.nbytes:
            last_end, last_name = info.start + info.nbytes, info.name
    return None


def read_json(path: Path) -> Any:
    """Read a small JSON file (config, index) as plain data; never executes anything."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CorruptCheckpoint(f"{path}: too large for a JSON side file", path=str(path))
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # also deep nesting and over-long integers
        raise CorruptCheckpoint(f"{path}: invalid JSON ({exc})", path=str(path)) from exc
    except OSError as exc:
        raise CorruptCheckpoint(f"{path}: cannot read ({exc.strerror})", path=str(path)) from exc


@dataclass
class Checkpoint:
    """A safetensors checkpoint on disk: a single file, an HF-style or a sharded directory."""

    root: Path
    files: list[Path]
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Checkpoint:
        """Locate the weight files under ``path`` and parse their headers (no tensor data)."""
        root = Path(path)
        if not root.exists():
            raise CheckpointNotFound(f"{root}: no such file or directory", path=str(root))
        if root.is_file():
            if root.suffix in PICKLE_SUFFIXES:
                raise PickleRefused(_pickle_message(root), path=str(root))
            files, config_dir, weight_map = [root], root.parent, None
        else:
            (files, weight_map), config_dir = _weight_files(root), root
        config_path = config_dir / "config.json"
        return cls.assemble(
            root,
            [(file, *read_header(file)) for file in files],
            config=read_json(config_path) if config_path.is_file() else None,
            weight_map=weight_map,
        )

    @classmethod
    def assemble(
        cls,
        root: Path,
        headers: list[tuple[Path, dict[str, TensorInfo], dict[str, str]]],
        *,
        config: Any = None,
        weight_map: dict[str, Any] | None = None,
    ) -> Self:
        """A checkpoint from parsed headers (local or remote), checked as a whole: no tensor in
        two files, and every index entry in the shard it names."""
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        for file, file_tensors, file_meta in headers:
            for name, info in file_tensors.items():
                if name in tensors:
                    raise CorruptCheckpoint(
                        f"{file}: tensor {name!r} also stored in {tensors[name].file.name}",
                        path=str(file),
                    )
                tensors[name] = info
            metadata.update(file_meta)
        if weight_map is not None:
            _check_index(root / INDEX_NAME, weight_map, tensors)
        return cls(
            root=root,
            files=[file for file, _, _ in headers],
            tensors=tensors,
            config=config if isinstance(config, dict) else None,
            metadata=metadata,
        )

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def names(self) -> list[str]:
        """Tensor names in natural order (numbers compared as numbers)."""
        return sorted(self.tensors, key=natural_key)

    def read(self, name: str) -> torch.Tensor:
        """One tensor as a fresh float32 CPU tensor (the only anonymous copy made)."""
        import torch

        info = self.tensors[name]
        if not info.is_float:
            raise CorruptCheckpoint(
                f"{info.file}: tensor {name!r} has dtype {info.dtype}, not a float weight",
                path=str(info.file),
            )
        torch_dtype = {
            "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16
        }[info.dtype]  # fmt: skip
        if info.numel == 0:
            return torch.zeros(info.shape, dtype=torch.float32)
        raw = torch.frombuffer(
            self._map(info.file), dtype=torch_dtype, count=info.numel, offset=info.start
        )
        # .to() on an f32 view would alias the map; clone so the result owns its memory.
        out = raw.to(torch.float32) if torch_dtype != torch.float32 else raw.clone()
        return out.view(info.shape)

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time in natural order."""
        for name in names if names is not None else self.names():
            yield name, self.read(name)

    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with file.open("rb") as fh:
                # ACCESS_COPY gives a writable (copy-on-write) buffer torch accepts without
                # warnings; pages are never written, so they stay shared page cache.
                self._maps[file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[file]

    def fingerprint(self, digest: Callable[[Path], str] | None = None) -> dict[str, str]:
        """sha256 of every weight file, keyed by its name relative to the checkpoint root.
        ``digest`` computes one file's (default :func:`sha256_file`; the result cache passes a
        memoised one)."""
        digest = digest or sha256_file
        key_of = (lambda f: f.name) if self.root.is_file() else (lambda f: self.relative(f))
        return {key_of(file): digest(file) for file in self.files}

    def relative(self, file: Path) -> str:
        return file.relative_to(self.root).as_posix()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _pickle_message(path: Path) -> str:
    return (
        f"{path}: pickle checkpoints can execute code when loaded and are not read by default; "
        "convert to safetensors (save_pretrained(..., safe_serialization=True)), or pass "
        "--allow-pickle to read plain weights with torch.load(weights_only=True)"
    )


def read_index(index: Path) -> tuple[list[str], dict[str, Any]]:
    """A sharded checkpoint's index (safetensors or pickle): its shard names in natural order,
    each checked to stay in the index's directory, and the weight map."""
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpoint(f"{index}: no 'weight_map' in the index", path=str(index))
    names = sorted({str(f) for f in weight_map.values()}, key=natural_key)
    for name in names:
        # No ``../`` or absolute paths. The check is on the name, not on where a link leads:
        # shards may be symlinks, as in the Hugging Face cache.
        if Path(name).name != name or name in ("", ".", ".."):
            raise CorruptCheckpoint(
                f"{index}: shard {name!r} is outside the checkpoint directory", path=str(index)
            )
    return names, weight_map


def _weight_files(root: Path) -> tuple[list[Path], dict[str, Any] | None]:
    """The weight files of a directory, and the index's weight map when it has one."""
    index = root / INDEX_NAME
    if index.is_file():
        names, weight_map = read_index(index)
        for name in names:
            if not (root / name).is_file():
                raise CorruptCheckpoint(
                    f"{index}: names shard {name!r}, which is missing", path=str(index)
                )
        return [root / name for name in names], weight_map
    single = root / "model.safetensors"
    if single.is_file():
        return [single], None
    files = sorted(root.glob("*.safetensors"), key=lambda p: natural_key(p.name))
    if files:
        return files, None
    pickles = sorted(p for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickleRefused(_pickle_message(pickles[0]), path=str(pickles[0]))
    raise EmptyCheckpoint(f"{root}: no .safetensors weights in this directory", path=str(root))


def _check_index(index: Path, weight_map: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file.name != shard:
            raise CorruptCheckpoint(
                f"{index}: tensor {name!r} is not in shard {shard!r}", path=str(index)
            )
