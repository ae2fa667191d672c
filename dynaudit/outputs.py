"""No output path may be an input (docs/reliability.md, "Bad inputs"): every report, plot, baseline
or demo path is checked against the files a run reads before anything is written.

The inputs of a run are its checkpoints (each weight file and side file, the directory itself,
and any name in it that a loader would read: a new ``model.safetensors`` beside healthy shards
changes what transformers loads), an adapter's base, a remote source's local copy, and baseline
directories and plot inputs as a whole. Paths are compared resolved (symlinks followed) and,
for existing files, by identity (device and inode: hard links too).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dynaudit.errors import OutputError, OutputRefused
from dynaudit.tensors import file_kind, loader_reads

__all__ = [
    "STDOUT",
    "Inputs",
    "guard_outputs",
    "is_stdout",
    "is_stream",
    "output_file",
]

STDOUT = "-"  # a report flag given `-` writes to standard output

_REMOTE = ("hf://", "models:/", "runs:/")
_WALK_LIMIT = 20_000  # files looked at per baseline directory when comparing identities


# Names of this process's standard output, whatever it is (a pipe, a terminal, a file the
# shell opened, in append mode or not): written through the descriptor, never replaced.
_STDOUT_NAMES = frozenset({"/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"})
# Names of other open descriptors: their target is the shell's, not a path to replace.
_DESCRIPTOR = re.compile(r"/dev/(stdin|stderr|fd/\d+)|/proc/(self|\d+)/fd/\d+")


def is_stdout(path: str | os.PathLike[str] | None) -> bool:
    """``-``, ``/dev/stdout`` (or ``/dev/fd/1``), or a path naming this process's standard
    output when that is a stream: the report goes to stdout, and nothing is replaced."""
    if path is None:
        return False
    given = os.fspath(path)
    if given == STDOUT or os.path.abspath(given) in _STDOUT_NAMES:
        return True
    try:
        st, out = os.stat(path), os.fstat(1)
    except (OSError, ValueError):
        return False
    return not stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino)


def names_a_descriptor(path: str | os.PathLike[str]) -> bool:
    """``/dev/stderr``, ``/dev/fd/N``, ``/proc/self/fd/N``: an open descriptor, whose file
    must not be replaced by a rename (the shell's redirection would lose it)."""
    return _DESCRIPTOR.fullmatch(os.path.abspath(os.fspath(path))) is not None


def is_stream(path: str | os.PathLike[str]) -> bool:
    """A FIFO (``--json >(jq .)``) or the null device: written into where it is, never
    replaced. Other devices are refused: writing into ``/dev/mem`` or a disk is no report."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return False
    if stat.S_ISFIFO(st.st_mode):
        return True
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.stat(os.devnull).st_rdev


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path.expanduser()))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


@dataclass
class Inputs:
    """What a run reads, each with how to name it in a message."""

    files: list[tuple[Path, str]] = field(default_factory=list)
    checkpoints: list[tuple[Path, str]] = field(default_factory=list)  # checkpoint directories
    trees: list[tuple[Path, str]] = field(default_factory=list)  # wholly input (a baseline)
    _seen: set[Path] = field(default_factory=set)

    def add_source(
        self, source: str | os.PathLike[str] | None, base: str | os.PathLike[str] | None = None
    ) -> None:
        """SOURCE when it names a local path (a remote one is added once resolved)."""
        if source is None:
            return
        text = os.fspath(source)
        if text.startswith(_REMOTE):
            return
        path = Path(text).expanduser()
        if path.exists():
            self.add_checkpoint(path, "the checkpoint", base)

    def add_reference(self, ref: str | os.PathLike[str] | None) -> None:
        """A baseline REF: a baseline directory (all of it), else a checkpoint SOURCE."""
        if ref is None:
            return
        text = os.fspath(ref)
        path = Path(text).expanduser()
        if not text.startswith(_REMOTE) and (path / "baseline.json").is_file():
            self.add_tree(path, "the baseline")
        else:
            self.add_source(text)

    def add_tree(self, path: Path, label: str) -> None:
        self.trees.append((path, label))

    def add_file(self, path: Path, label: str) -> None:
        self.files.append((path, label))

    def add_checkpoint(
        self,
        path: Path,
        label: str,
        base: str | os.PathLike[str] | None = None,
        files: Mapping[str, str] | None = None,
    ) -> None:
        """A local checkpoint (file or directory) and, for a LoRA adapter, its local base.
        ``files`` are its weight files as a report lists them (relative names)."""
        key = _real(path)
        if key in self._seen and not files:
            return
        self._seen.add(key)
        folder = path if path.is_dir() else path.parent
        if path.is_dir():
            self.checkpoints.append((path, label))
        else:
            self.files.append((path, label))
            self.files.append((folder / "config.json", label))  # read beside a single file
        for name in files or {}:
            relative = name.removeprefix("adapter/")
            self.files.append(((path if path.is_dir() else folder) / relative, label))
        adapter = folder / "adapter_config.json"
        if (path.is_dir() or path.name.startswith("adapter_model")) and adapter.is_file():
            ref = base if base is not None else _adapter_base(adapter)
            if ref is not None and not os.fspath(ref).startswith(_REMOTE):
                base_path = Path(os.fspath(ref)).expanduser()
                if not base_path.is_absolute() and not base_path.exists():
                    base_path = folder / base_path
                if base_path.exists():
                    self.add_checkpoint(base_path, f"the base of {label}")

    def clash(self, out: Path) -> tuple[str, Path] | None:
        """The input that ``out`` would overwrite (or write into), if any."""
        target = _real(out)
        for path, label in self.files:
            if _real(path) == target:
                return label, path
        for path, label in self.trees:
            root = _real(path)
            if target == root or root in target.parents:
                return label, path
        for path, label in self.checkpoints:
            root = _real(path)
            if target == root or (root in target.parents and loader_reads(target.name)):
                return label, path
        identity = _identity(out)
        if identity is not None:
            for path, label in self._identified():
                if _identity(path) == identity:
                    return label, path
        return None

    def _identified(self) -> Iterator[tuple[Path, str]]:
        """Every existing input file, for comparing identities (hard links)."""
        yield from self.files
        for root, label in self.checkpoints:
            try:
                yield from ((f, label) for f in root.iterdir() if loader_reads(f.name))
            except OSError:
                continue
        for root, label in self.trees:
            count = 0
            for folder, _, names in os.walk(root):
                for name in names:
                    count += 1
                    if count > _WALK_LIMIT:
                        break
                    yield Path(folder) / name, label


def _adapter_base(config: Path) -> str | None:
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None  # the audit itself reports an unreadable config
    named = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    return named if isinstance(named, str) and named else None


def guard_outputs(
    outputs: Mapping[str, str | os.PathLike[str] | None],
    inputs: Inputs,
    *,
    directory: bool = False,
) -> None:
    """Refuse before writing: an output that is an input or inside a baseline (exit 2, naming
    both), two outputs to one path (exit 2), a path that cannot be a file (an existing
    directory, FIFO or device, or below a file: exit 2), a directory that cannot be written in
    (exit 3). ``outputs`` maps each flag to its path (None: not given). ``directory``: the
    outputs are directories to create (``baseline --out``, ``demo --out``)."""
    given = {flag: path for flag, path in outputs.items() if path is not None}
    seen: dict[object, str] = {}
    for flag, path in given.items():
        if is_stdout(path):
            if directory:
                raise OutputRefused(f"{flag} -: this output is a directory, not a stream")
            key: object = STDOUT
        else:
            key = _identity(Path(path)) or _real(Path(path))
        if key in seen:
            raise OutputRefused(
                f"{seen[key]} and {flag} are the same path ({os.fspath(path)}); "
                "two outputs to one path would keep only one",
                path=os.fspath(path),
            )
        seen[key] = f"{flag} {os.fspath(path)}" if key != STDOUT else flag
    for flag, path in given.items():
        if is_stdout(path):
            continue
        out = Path(path)
        found = inputs.clash(out)
        if found is not None:
            label, where = found
            raise OutputRefused(
                f"{flag} {out}: would write over {label} {where}; an output never touches an "
                "input, choose another path",
                path=str(out),
            )
        if not directory:
            output_file(out, flag)
        if not is_stream(out):  # written into where it is: its folder is not written
            _writable_parent(out, flag)


def output_file(path: Path, flag: str = "") -> Path:
    """The regular file that writing ``path`` replaces or creates: a symlink is followed to the
    file it names. A FIFO or the null device is returned as it is: it is written into. Anything
    else there (a directory, another device, a socket, a symlink to such or to nothing) is
    refused: it is never replaced."""
    named = f"{flag} {path}" if flag else str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise OutputRefused(f"{named}: a symbolic link to nothing", path=str(path)) from None
        return path
    except NotADirectoryError:
        raise OutputRefused(f"{named}: a parent is not a directory", path=str(path)) from None
    except OSError as exc:
        raise OutputError(f"{named}: cannot write ({exc.strerror or exc})", path=str(path)) from exc
    if stat.S_ISDIR(st.st_mode):
        raise OutputRefused(f"{named}: is a directory; give a file path", path=str(path))
    if is_stream(path):
        return path  # written into, not replaced
    if names_a_descriptor(path):
        raise OutputRefused(
            f"{named}: names an open file descriptor; give a file path, or - for stdout",
            path=str(path),
        )
    if not stat.S_ISREG(st.st_mode):
        raise OutputRefused(
            f"{named}: is {file_kind(st.st_mode)}, not a regular file or a stream; it is never "
            "replaced",
            path=str(path),
        )
    return _real(path) if os.path.islink(path) else path


def _writable_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a directory this process can write in."""
    ancestor = _real(path).parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputRefused(f"{flag} {path}: {ancestor} is not a directory", path=str(path))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(
            f"{flag} {path}: cannot write in {ancestor} (permission denied)", path=str(path)
        )
