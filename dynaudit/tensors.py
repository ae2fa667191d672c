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
import stat
import struct
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from dynaudit.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    EmptyCheckpoint,
    InputError,
    NotARegularFile,
    PickleRefused,
    listed,
)
from dynaudit.quantized import FP8_DTYPES, NONE, Dequantization, dequantize_fp8, plan_dequantization

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

__all__ = [
    "INDEX_NAME",
    "PICKLE_INDEX",
    "PICKLE_SUFFIXES",
    "SAFETENSORS_SUFFIXES",
    "SIDE_FILES",
    "WEIGHT_SUFFIXES",
    "Checkpoint",
    "TensorInfo",
    "WeightSelection",
    "is_weight_name",
    "loader_reads",
    "local_selection",
    "natural_key",
    "open_regular",
    "parse_header",
    "present",
    "read_index",
    "read_text",
    "require_regular",
    "select_weights",
    "sha256_file",
    "weight_names",
]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Names that hold or index safetensors weights; any weight file's suffix (safetensors or pickle).
SAFETENSORS_SUFFIXES = (".safetensors", ".safetensors.index.json")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# safetensors' own reader refuses headers above 100 MB; so do we, before allocating anything.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_JSON_BYTES = 64 * 1024 * 1024

# Bits per element of every dtype safetensors 0.8 defines. Sub-byte ones (F4, F6) pack
# several elements per byte, and a tensor of them must fill whole bytes.
DTYPE_BITS = {
    "F64": 64,
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "F4": 4,
    "C64": 64,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U64": 64,
    "U32": 32,
    "U16": 16,
    "U8": 8,
    "BOOL": 8,
}
# Read as float32 weights (exactly; FP8 ones times their scales, dynaudit.quantized). The
# others (integers, booleans, complex, packed FP4/FP6 and F8_E8M0 scales) are never layers.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", *FP8_DTYPES})
# The torch dtype of each (torch >= 2.2 has every one).
_TORCH_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}


def _stacked(info: TensorInfo, index: int) -> TensorInfo:
    """Entry ``index`` along the first axis of a stored tensor, as a tensor of its own: its
    bytes are contiguous, ``nbytes / shape[0]`` of them from ``start + index · that``."""
    if not info.shape or not 0 <= index < info.shape[0]:
        raise IndexError(f"{info.name}: no entry {index} along the first axis of {info.shape}")
    each = info.nbytes // info.shape[0]
    return replace(info, shape=info.shape[1:], start=info.start + index * each, nbytes=each)


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
    # Why this tensor is part of another one rather than a weight ("FP8 scale of X"): set by
    # the checkpoint that holds it (dynaudit.quantized), None in a parsed header.
    role: str | None = None

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words with its article ("a FIFO (named pipe)")."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def require_regular(path: Path, what: str) -> os.stat_result:
    """``path``'s status, after checking (symlinks followed, nothing opened) that it is a
    regular file: opening a FIFO blocks until a writer comes, a device never ends."""
    try:
        info = path.stat()
    except FileNotFoundError as exc:
        dangling = path.is_symlink()
        raise (NotARegularFile if dangling else CheckpointNotFound)(
            f"{path}: {what} is " + ("a link to nothing" if dangling else "missing"),
            path=str(path),
        ) from exc
    except OSError as exc:
        raise CorruptCheckpoint(
            f"{path}: cannot read {what} ({exc.strerror})", path=str(path)
        ) from exc
    if not stat.S_ISREG(info.st_mode):
        raise NotARegularFile(
            f"{path}: {what} is {file_kind(info.st_mode)}, not a regular file; refusing to open it",
            path=str(path),
        )
    return info


def present(path: Path, what: str) -> bool:
    """Whether an optional file (a config, a model card) is there; one that is there but is
    not a regular file is refused rather than skipped or opened."""
    if not os.path.lexists(path):
        return False
    require_regular(path, what)
    return True


def open_regular(path: Path, what: str) -> BinaryIO:
    """``path`` opened for binary reading, only if it is a regular file: checked before
    opening, and again on the open descriptor (opened non-blocking, so a file swapped for a
    FIFO in between cannot block)."""
    require_regular(path, what)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(
                f"{path}: {what} is {file_kind(mode)}, not a regular file; refusing to read it",
                path=str(path),
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_text(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> str:
    """A small UTF-8 side file (a model card), read only if it is a regular file."""
    try:
        with open_regular(path, what) as fh:
            return fh.read(limit).decode("utf-8", errors="replace")
    except OSError as exc:
        raise CorruptCheckpoint(
            f"{path}: cannot read {what} ({exc.strerror})", path=str(path)
        ) from exc


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one local ``.safetensors`` header; returns (tensors, metadata)."""
    try:
        with open_regular(path, "a weight file") as fh:
            size = os.fstat(fh.fileno()).st_size

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
    _refuse_surrogates(path, header, "safetensors header")
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


_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse_surrogates(path: Path, data: Any, what: str) -> None:
    """JSON may escape half a UTF-16 pair (``"\\ud800"``): Python decodes it to a string
    that cannot be encoded, printed or used as a file name. Refused here, naming where."""
    pending = [data]
    while pending:
        item = pending.pop()
        strings: list[str] = []
        if isinstance(item, dict):
            strings = [k for k in item if isinstance(k, str)]
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            strings = [item]
        for text in strings:
            if _SURROGATE.search(text):
                raise CorruptCheckpoint(
                    f"{path}: {what} holds a string with a lone UTF-16 surrogate "
                    f"({text[:60]!r}), "
                    "which is not valid Unicode",
                    path=str(path),
                )


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    def bad(problem: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"{path}: tensor {name!r}: {problem}", path=str(path))

    if not isinstance(entry, dict):
        raise bad("header entry is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
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
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        raise bad(f"shape {shape} as {dtype} does not fill whole bytes ({bits} bits)")
    if bits // 8 != end - begin:
        raise bad(f"shape {shape} as {dtype} needs {bits // 8} bytes, offsets give {end - begin}")
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
        with open_regular(path, "a JSON side file") as fh:
            if os.fstat(fh.fileno()).st_size > MAX_JSON_BYTES:
                raise CorruptCheckpoint(f"{path}: too large for a JSON side file", path=str(path))
            data = json.loads(fh.read().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # also deep nesting and over-long integers
        raise CorruptCheckpoint(f"{path}: invalid JSON ({exc})", path=str(path)) from exc
    except OSError as exc:
        raise CorruptCheckpoint(f"{path}: cannot read ({exc.strerror})", path=str(path)) from exc
    _refuse_surrogates(path, data, "JSON")
    return data


def _sentence_transformers_module(root: Path) -> Path | None:
    """The folder of the transformer module that a sentence-transformers ``modules.json``
    names (``0_Transformer`` before sentence-transformers 2 kept the weights there), when it
    is a plain sub-folder of ``root``; None otherwise."""
    if not present(root / "modules.json", "modules.json"):
        return None
    modules = read_json(root / "modules.json")
    for module in modules if isinstance(modules, list) else []:
        kind, where = (
            module.get(k) if isinstance(module, dict) else None for k in ("type", "path")
        )
        if not (isinstance(kind, str) and kind.endswith(".Transformer") and isinstance(where, str)):
            continue
        folder = root / where
        plain = where not in ("", ".", "..") and "/" not in where and "\\" not in where
        if plain and not folder.is_symlink() and folder.is_dir():
            return folder
    return None


@dataclass
class Checkpoint:
    """A safetensors checkpoint on disk: a single file, an HF-style or a sharded directory."""

    root: Path
    files: list[Path]
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # Which of a directory's weight files were read and why (None for a single file).
    selection: WeightSelection | None = None
    # sha256 of weight files the source has and vouched for but did not download (the Hub's
    # unread shards): the fingerprint covers them too.
    vouched: dict[str, str] = field(default_factory=dict)
    # Where in its files the weights were found, when not at the top level (the key of a
    # pickle training checkpoint): a line for the report.
    weights_note: str | None = None
    # FP8 weights' scales, planned from the headers and config.json (dynaudit.quantized);
    # quantized weights of any other kind are refused here, whichever way the checkpoint opens.
    dequantization: Dequantization = field(default=NONE, init=False, repr=False)
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.dequantization = plan_dequantization(self.tensors, self.config, self.root)
        roles = self.dequantization.roles
        if roles:
            self.tensors = {
                name: replace(info, role=roles[name]) if name in roles else info
                for name, info in self.tensors.items()
            }

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Checkpoint:
        """Locate the weight files under ``path`` and parse their headers (no tensor data).
        A directory's weights are chosen by :func:`select_weights`; nothing that is not a
        regular file is ever opened."""
        root = Path(path)
        mode = _source_mode(root)
        if stat.S_ISDIR(mode):
            local = _select_local(root)
            selection, config = local.selection, local.config
            if selection.pickle:
                first = root / selection.files[0]
                raise PickleRefused(_pickle_message(first), path=str(first))
            if not selection.files:
                module = _sentence_transformers_module(root)
                if module is not None:  # sentence-transformers < 2: weights in 0_Transformer/
                    opened = cls.open(module)
                    opened.weights_note = (
                        f"the transformer module {module.name}/ that modules.json names "
                        "(a sentence-transformers folder)"
                    )
                    return opened
                raise EmptyCheckpoint(
                    f"{root}: no .safetensors weights in this directory", path=str(root)
                )
            files, weight_map = [root / name for name in selection.files], local.weight_map
        else:
            if root.suffix in PICKLE_SUFFIXES:
                raise PickleRefused(_pickle_message(root), path=str(root))
            config_path = root.parent / "config.json"
            config = read_json(config_path) if present(config_path, "config.json") else None
            files, weight_map, selection = [root], None, None
        checkpoint = cls.assemble(
            root,
            [(file, *read_header(file)) for file in files],
            config=config,
            weight_map=weight_map,
        )
        checkpoint.selection = selection
        return checkpoint

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

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """One tensor as a fresh float32 CPU tensor (the only anonymous copy made); an FP8
        weight with a scale tensor comes dequantized: multiplied by its scales in place.
        With ``index``, only ``tensor[index]`` of a stack (fused experts), read alone."""
        info = self.tensors[name]
        scale = self.dequantization.scales.get(name)
        if index is not None and scale is None:
            return self._float32(_stacked(info, index))
        out = self._float32(info)
        if scale is not None and out.numel():
            dequantize_fp8(out, self._float32(self.tensors[scale.tensor]), scale.block)
        return out if index is None else out[index].clone()

    def _float32(self, info: TensorInfo) -> torch.Tensor:
        """The stored values of a float tensor, converted (exactly, but for F64) to float32."""
        import torch

        if not info.is_float:
            raise CorruptCheckpoint(
                f"{info.file}: tensor {info.name!r} has dtype {info.dtype}, not a float weight",
                path=str(info.file),
            )
        torch_dtype = getattr(torch, _TORCH_DTYPES[info.dtype])
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
            with open_regular(file, "a weight file") as fh:
                # ACCESS_COPY gives a writable (copy-on-write) buffer torch accepts without
                # warnings; pages are never written, so they stay shared page cache.
                self._maps[file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[file]

    def fingerprint(self, digest: Callable[[Path], str] | None = None) -> dict[str, str]:
        """sha256 of every weight file present, keyed by its name relative to the checkpoint
        root: the files read, the index, and the weight files present but not read (so a
        changed unread shard changes the result-cache key too), and those the source vouched
        for without downloading them. ``digest`` computes one file's (default
        :func:`sha256_file`; the result cache passes a memoised one)."""
        digest = digest or sha256_file
        if self.selection is None:
            key_of = (lambda f: f.name) if self.root.is_file() else (lambda f: self.relative(f))
            return {key_of(file): digest(file) for file in self.files}
        found = {self.relative(file): digest(file) for file in self.files}
        for name in self.selection.others:
            if name not in found and (self.root / name).exists():
                found[name] = digest(self.root / name)
        return {**self.vouched, **found}

    @property
    def selection_note(self) -> str | None:
        """What the report says about which weights were read: the weight files of the
        directory that were not, where in the files the weights were found, and the FP8
        weights dequantized as they were read."""
        notes = [
            self.selection.note if self.selection is not None else None,
            self.weights_note,
            self.dequantization.note,
        ]
        return "; ".join(note for note in notes if note) or None

    def unread_weights(self) -> list[str]:
        """Weight files that transformers' ``from_pretrained`` would read from this
        checkpoint's directory and the audit did not: none for a checkpoint opened by
        :func:`select_weights`; anything else is a checkpoint assembled some other way."""
        if self.selection is None or not self.root.is_dir():
            return []
        loaded = _select_local(self.root).selection
        audited = {file.name for file in self.files if file.parent == self.root}
        if loaded.pickle and self.selection.pickle:
            return []  # read through their converted copy
        return [name for name in loaded.files if name not in audited]

    def relative(self, file: Path) -> str:
        return file.relative_to(self.root).as_posix()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path, "this file") as fh:
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


@dataclass(frozen=True)
class WeightSelection:
    """Which files of a checkpoint directory are its weights, and why: see
    :func:`select_weights`. Names are relative to the directory."""

    files: tuple[str, ...]  # what is read, in order: the one file, or the index's shards
    reason: str
    index: str | None = None  # the index that names ``files``
    pickle: bool = False
    unaudited: tuple[str, ...] = ()  # weight files present that are not read

    @property
    def others(self) -> tuple[str, ...]:
        """The weight files present besides ``files``: the index, and the unread ones."""
        return ((self.index,) if self.index else ()) + self.unaudited

    @property
    def note(self) -> str | None:
        """One line for the report, when the directory held weights that were not read."""
        if not self.unaudited:
            return None
        audited, unaudited = listed(self.files, 4), listed(self.unaudited, 4)
        return f"audited {audited} ({self.reason}); not audited: {unaudited}"


def is_weight_name(name: str) -> bool:
    """A top-level file name that holds or indexes weights a loader could read: every
    ``.safetensors`` file and safetensors index, and transformers' pickle weights and index
    (``pytorch_model*.bin``). Other pickles (``training_args.bin``, ``optimizer.pt``) are
    weights only when nothing else is: see :func:`select_weights`."""
    if "/" in name:
        return False
    if name.endswith(SAFETENSORS_SUFFIXES):
        return True
    return name.startswith("pytorch_model") and name.endswith((".bin", ".bin.index.json"))


def weight_names(names: Collection[str]) -> list[str]:
    """The weight files among a directory's (or repository's) file names, naturally ordered."""
    return sorted((n for n in names if is_weight_name(n)), key=natural_key)


def select_weights(
    names: Collection[str],
    shards: Callable[[str], list[str]],
    *,
    explicit: str | None = None,
    where: str = "",
) -> WeightSelection:
    """Which of a checkpoint's files (names relative to its root) are its weights: the rule
    of transformers' ``from_pretrained`` with its defaults (``_get_resolved_checkpoint_files``:
    no variant, ``use_safetensors`` unset), for local directories and the Hub alike.

    1. ``config.json``'s ``transformers_weights`` (``explicit``), when it names a file;
    2. ``model.safetensors``, even when an index is present too;
    3. ``model.safetensors.index.json``: the shards it names (``shards(index)``);
    4. ``pytorch_model.bin``, then ``pytorch_model.bin.index.json``: pickles;
    5. beyond what transformers loads: every top-level ``.safetensors`` file, else every
       top-level pickle.

    ``files`` is empty when there are no weights. Raises nothing itself except for an
    ``explicit`` name that cannot be followed (``where`` says which checkpoint); ``shards``
    may raise."""
    top = {name for name in names if "/" not in name}
    present_weights = weight_names(top)

    def chosen(
        files: list[str], reason: str, index: str | None = None, pickle: bool = False
    ) -> WeightSelection:
        read = {*files, *([index] if index else [])}
        unaudited = tuple(name for name in present_weights if name not in read)
        return WeightSelection(tuple(files), reason, index, pickle, unaudited)

    if explicit is not None:
        named = "config.json's transformers_weights"
        if explicit not in top or not explicit.endswith(SAFETENSORS_SUFFIXES):
            raise InputError(
                f"{where or 'checkpoint'}: {named} names {explicit!r}, which is not a "
                ".safetensors file or index at the top of the checkpoint; transformers would "
                "not load these weights either"
            )
        if explicit.endswith(".index.json"):
            return chosen(shards(explicit), f"{named} names {explicit}", index=explicit)
        return chosen([explicit], f"{named} names it")
    if SINGLE_NAME in top:
        after = f" before {INDEX_NAME}" if INDEX_NAME in top else " first"
        return chosen([SINGLE_NAME], f"transformers loads {SINGLE_NAME}{after}")
    if INDEX_NAME in top:
        return chosen(shards(INDEX_NAME), f"the shards {INDEX_NAME} names", index=INDEX_NAME)
    if PICKLE_NAME in top:
        return chosen([PICKLE_NAME], f"transformers loads {PICKLE_NAME}", pickle=True)
    if PICKLE_INDEX in top:
        return chosen(
            shards(PICKLE_INDEX),
            f"the shards {PICKLE_INDEX} names",
            index=PICKLE_INDEX,
            pickle=True,
        )
    safetensors = sorted((n for n in top if n.endswith(".safetensors")), key=natural_key)
    if safetensors:
        return chosen(safetensors, f"no {SINGLE_NAME} or index: every .safetensors file")
    pickles = sorted((n for n in top if n.endswith(PICKLE_SUFFIXES)), key=natural_key)
    if pickles:
        return chosen(pickles, "only pickle weights", pickle=True)
    return chosen([], "no weight files")


# Small files read beside the weights (the model card carries `base_model`).
SIDE_FILES = ("config.json", INDEX_NAME, "adapter_config.json", "README.md")


def loader_reads(name: str) -> bool:
    """A file name that a loader (transformers, dynaudit) may read in a checkpoint directory:
    any weight file or index, whether or not :func:`select_weights` picks it today (a new
    ``model.safetensors`` beside healthy shards changes what is loaded), and the side files."""
    return name.endswith((*WEIGHT_SUFFIXES, ".index.json")) or name in SIDE_FILES


@dataclass(frozen=True)
class _Local:
    selection: WeightSelection
    weight_map: dict[str, Any] | None
    config: dict[str, Any] | None


def _select_local(root: Path) -> _Local:
    """:func:`select_weights` over a directory, after checking that every weight and side
    file in it is a regular file (a FIFO would block the first read, or the fingerprint)."""
    try:
        names = [entry.name for entry in os.scandir(root)]
    except OSError as exc:
        raise CorruptCheckpoint(f"{root}: cannot list ({exc.strerror})", path=str(root)) from exc
    for side in SIDE_FILES:
        present(root / side, side)
    for name in weight_names(names):
        require_regular(root / name, "a weight file")
    config_path = root / "config.json"
    config = read_json(config_path) if config_path.exists() else None
    config = config if isinstance(config, dict) else None
    explicit = config.get("transformers_weights") if config else None
    maps: dict[str, dict[str, Any]] = {}

    def shards(index_name: str) -> list[str]:
        index = root / index_name
        require_regular(index, "the index")
        shard_names, maps[index_name] = read_index(index)
        for name in shard_names:
            if not os.path.lexists(root / name):
                raise CorruptCheckpoint(
                    f"{index}: names shard {name!r}, which is missing", path=str(index)
                )
            require_regular(root / name, "a shard")
        return shard_names

    selection = select_weights(
        names, shards, explicit=explicit if isinstance(explicit, str) else None, where=str(root)
    )
    weight_map = maps.get(selection.index) if selection.index and not selection.pickle else None
    return _Local(selection, weight_map, config)


def local_selection(root: Path) -> WeightSelection:
    """:func:`select_weights` over a local directory (every file in it identified first)."""
    return _select_local(root).selection


def _source_mode(root: Path) -> int:
    """SOURCE's file type: a directory or a regular file, else refused before any open."""
    try:
        mode = root.stat().st_mode
    except FileNotFoundError as exc:
        if root.is_symlink():
            raise NotARegularFile(f"{root}: a link to nothing", path=str(root)) from exc
        raise CheckpointNotFound(f"{root}: no such file or directory", path=str(root)) from exc
    except OSError as exc:
        raise CorruptCheckpoint(f"{root}: cannot read ({exc.strerror})", path=str(root)) from exc
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise NotARegularFile(
            f"{root}: the checkpoint is {file_kind(mode)}, not a .safetensors file or a directory",
            path=str(root),
        )
    return mode


def _check_index(index: Path, weight_map: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file.name != shard:
            raise CorruptCheckpoint(
                f"{index}: tensor {name!r} is not in shard {shard!r}", path=str(index)
            )
