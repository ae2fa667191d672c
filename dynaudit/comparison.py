"""Baselines and comparisons (SPEC §4.9, §5).

A **baseline** of a reference checkpoint holds, per layer, K cold fits (K seeds) and, for each,
its *null refit*: the warm-start procedure of a comparison applied to the reference itself. A
checkpoint is **compared** by warm-starting from each stored cold fit on its own weights (scaled
by the reference's s) and reading its mean distance against the matching null refit, so the
optimiser's own drift cancels: K relative changes give a mean ± std per layer.

On disk a baseline is a directory::

    baseline.json      what was measured, how (settings, protocol), from which files
    coords/NNNNN.safetensors   per layer: cold.<k> and null.<k> coordinates, (g, H, m + n, k),
                               and the sketch of its weights (dynamics.sketch)
    manifest.json      sha256 of every file above, verified on load

written in a staging directory next to the target and renamed into place when complete.

A baseline is a closed world: every file that baseline.json names is in the manifest and lies
inside the directory (symlinks resolved), is a regular file, and holds exactly the tensors its
layer and the baseline's settings call for; every number is finite. Anything else is refused
as "tampered or corrupt" (exit 3) before a single refit, so no edit can make ``check`` read
coordinates from another layer, another baseline or outside the directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import stat
import statistics
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal, TypeGuard

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dynaudit.config import PROTOCOL_VERSION, FitSettings
from dynaudit.distributed import Ranks, assign
from dynaudit.dynamics import discrepancy, fit_coordinates
from dynaudit.dynamics.blocks import block_seed, block_shape, fit_flop, take_blocks
from dynaudit.dynamics.kernel import warm_steps
from dynaudit.dynamics.metrics import fidelity as fidelity_of
from dynaudit.dynamics.sketch import SIDE, sketch, weight_figures
from dynaudit.engine import CoordsSink, Progress, layer_groups, load_layer
from dynaudit.errors import CorruptCheckpoint, InputError, UsageError
from dynaudit.families import Family, Layer, LayerPlan
from dynaudit.families.base import matrix_shape
from dynaudit.policy import (
    Change,
    Comparison,
    GroupComparison,
    LayerComparison,
    Policy,
    layer_undecided,
    scope_undecided,
)
from dynaudit.report import DEPTH_GROUPS, FamilyInfo, Report, SourceInfo
from dynaudit.runtime import to_device
from dynaudit.schemas import FORMATS, minor_field, strip_unknown, warn_ignored
from dynaudit.tensors import Checkpoint, parse_header

__all__ = [
    "Baseline",
    "BaselineError",
    "BaselineLayer",
    "BaselineWriter",
    "compare_plan",
    "load_baseline",
    "read_coords",
]

BASELINE_FILE = "baseline.json"
MANIFEST_FILE = "manifest.json"
COORDS_DIR = "coords"
# The layout of the directory and of baseline.json: bump when an older dynaudit could not read
# a new baseline. A baseline without the field is format 1 (all baselines so far). A change an
# older dynaudit can read by ignoring fields bumps the minor instead (dynaudit.schemas).
BASELINE_FORMAT: Final = 1
# Written in each coordinate file's safetensors metadata: which layer it belongs to.
LAYER_KEY = "dynaudit.layer"


# A writer's files, cold and null mean distances, by layer (exchanged between ranks).
Records = tuple[dict[str, str], dict[str, list[float]], dict[str, list[float]]]


class BaselineError(InputError):
    """A baseline that cannot be used: missing, tampered, or made with other settings."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BaselineLayer(_Model):
    name: str
    type: str
    depth: int
    group: Literal["bottom", "middle", "top"]
    shape: list[int] = Field(description="matrix shape (g, m, n) as fitted")
    scale: float | None
    coords: str | None = Field(description="file under coords/, null when not fitted")
    cold_mean_distance: list[float] = Field(default_factory=list, description="per seed")
    null_mean_distance: list[float] = Field(default_factory=list, description="per seed")
    reason: str | None = None
    digest: str | None = Field(
        None,
        description="sha256 of the layer's float32 (g, m, n) matrices before scaling "
        "(engine.layer_digest); a checked layer with the same digest is not refitted. Absent "
        "from baselines made before digests: their layers are always refitted",
    )


class Baseline(_Model):
    format_version: Literal[1] = Field(BASELINE_FORMAT, description="the format's major version")
    format_minor: int = minor_field("baseline")
    protocol_version: int
    tool: dict[str, str]
    created_at: str
    source: SourceInfo
    family: FamilyInfo
    settings: dict[str, Any] = Field(description="the fit settings every comparison must use")
    seeds: int
    layers: list[BaselineLayer]
    report: Report = Field(description="the reference's own measurement (cold fits)")
    stored_at: str | None = Field(None, description="where it was stored (dir or runs:/ URI)")

    def fit_settings(self) -> FitSettings:
        return FitSettings(**self.settings)


# -- writing ----------------------------------------------------------------------------


class BaselineWriter:
    r"""Collects cold fits and their null refits while the engine measures the reference
    (through :meth:`sink`), writing each layer's coordinates as soon as its last seed is done.
    Under torchrun every rank writes its own layers' files into the one staging directory
    (named by plan order, so they never collide) and rank 0 :meth:`absorb`\ s the others'
    records."""

    def __init__(self, staging: Path, settings: FitSettings, layers: list[str]) -> None:
        self.staging = staging
        self.settings = settings
        self._index = {name: i for i, name in enumerate(layers)}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self.cold: dict[str, list[float]] = {}
        self.null: dict[str, list[float]] = {}
        self.files: dict[str, str] = {}

    @property
    def sink(self) -> CoordsSink:
        return self._take

    def _take(
        self,
        layers: list[Layer],
        owners: list[int],
        offset: int,
        coords: torch.Tensor,
        target: torch.Tensor,
    ) -> None:
        _, m, n = target.shape
        null = fit_coordinates(
            target, self.settings, coords, steps=warm_steps(self.settings, m, n),
            lr=self.settings.warm_lr,
        )  # fmt: skip
        _, cold_md = discrepancy(coords)
        _, null_md = discrepancy(null)
        members: dict[int, list[int]] = {}  # one pass: a scan per layer was quadratic
        for j, owner in enumerate(owners):
            members.setdefault(owner, []).append(j)
        for i, layer in enumerate(layers):
            rows = members.get(i, [])
            tensors = self._pending.setdefault(layer.name, {})
            tensors[f"cold.{offset}"] = coords[rows].cpu().contiguous()
            tensors[f"null.{offset}"] = null[rows].cpu().contiguous()
            if offset == 0:  # what the seed-0 fit saw, for the weight-change figure
                tensors["sketch"] = sketch(target[rows], layer.name)
            self.cold.setdefault(layer.name, []).append(float(cold_md[rows].mean()))
            self.null.setdefault(layer.name, []).append(float(null_md[rows].mean()))
            if offset == self.settings.seeds - 1:
                self._flush(layer.name)

    def _flush(self, name: str) -> None:
        from safetensors.torch import save_file

        file = f"{COORDS_DIR}/{self._index[name]:05d}.safetensors"
        # The layer's name travels with its coordinates: a file moved to another layer's
        # place (and re-hashed into the manifest) is still caught on load.
        save_file(self._pending.pop(name), str(self.staging / file), metadata={LAYER_KEY: name})
        self.files[name] = file

    @property
    def records(self) -> Records:
        """What this writer wrote: files, cold and null mean distances, by layer."""
        return self.files, self.cold, self.null

    def absorb(self, parts: list[Records]) -> None:
        """Take in the records of every rank of a job (this one's included)."""
        for files, cold, null in parts:
            self.files.update(files)
            self.cold.update(cold)
            self.null.update(null)

    def finish(self, baseline: Baseline, out: Path) -> Path:
        """Write baseline.json and the manifest, then rename the staging directory to ``out``."""
        from dynaudit.cache import publish_dir

        (self.staging / BASELINE_FILE).write_text(baseline.model_dump_json(indent=1))
        manifest = {
            path.relative_to(self.staging).as_posix(): _sha256(path, path)
            for path in sorted(self.staging.rglob("*"))
            if path.is_file()
        }
        (self.staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        if not publish_dir(self.staging, out):
            raise UsageError(f"{out}: written by another process meanwhile; not overwritten")
        return out


def refuse_existing(out: Path) -> None:
    """A baseline is never overwritten: ``out`` must not exist yet."""
    if out.exists():
        raise UsageError(
            f"{out}: already exists; a baseline is never overwritten (choose another --out)"
        )


def staging_for(out: Path) -> Path:
    """A fresh staging directory beside ``out`` (same filesystem, so the rename is atomic),
    created with its ``coords/``; ``out`` must not exist."""
    from dynaudit.cache import sweep_stale

    refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out.parent)  # what a killed `baseline` left here more than a day ago
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    (staging / COORDS_DIR).mkdir(parents=True)
    return staging


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


# -- reading ----------------------------------------------------------------------------

_SHA256 = re.compile(r"[0-9a-f]{64}")
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_BINARY = getattr(os, "O_BINARY", 0)
COORDS_DTYPE = "F32"  # what the writer stores (the fits run in float32)
SKETCH = "sketch"


def is_baseline(path: Path) -> bool:
    """A directory holding a ``baseline.json`` — of whatever kind: one that is not a regular
    file is then refused by :func:`load_baseline`, rather than the directory being read as a
    checkpoint."""
    return path.is_dir() and os.path.lexists(path / BASELINE_FILE)


def load_baseline(path: Path) -> Baseline:
    """Read a baseline directory, checking the closed world (module docstring): every file
    against the manifest, every file baseline.json names in the manifest and inside the
    directory, the numbers of baseline.json, and the headers of the coordinate files (their
    values are checked when :func:`read_coords` reads them)."""
    try:
        root = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise BaselineError(f"{path}: no baseline here ({exc})", path=str(path)) from exc
    data = _read(path, root, BASELINE_FILE)
    # Before the manifest: a newer format may lay out the directory differently.
    _refuse_newer(data, path)
    manifest = _read_manifest(path, root)
    if hashlib.sha256(data).hexdigest() != manifest[BASELINE_FILE]:
        raise _sha_differs(path / BASELINE_FILE)
    for name, expected in manifest.items():
        if name != BASELINE_FILE and _sha256(_member(path, root, name), path / name) != expected:
            raise _sha_differs(path / name)
    _refuse_unlisted(path, root, manifest)
    baseline = _parse(data, path)
    if baseline.protocol_version != PROTOCOL_VERSION:  # older: its numbers are not ours
        raise BaselineError(
            f"{path}: made with protocol v{baseline.protocol_version}, this dynaudit uses "
            f"v{PROTOCOL_VERSION}; re-create the baseline",
            path=str(path),
        )
    fit = _check_numbers(baseline, path)
    referenced: set[str] = set()
    for layer in baseline.layers:
        if layer.coords is None:
            continue
        where = path / layer.coords
        file = _member(path, root, layer.coords)  # confined first: nothing outside is opened
        if layer.coords not in manifest:
            raise _corrupt(where, f"named by {BASELINE_FILE} but not in {MANIFEST_FILE}")
        if layer.coords in referenced:
            raise _corrupt(where, f"named by two layers of {BASELINE_FILE}")
        referenced.add(layer.coords)
        with _open_regular(file, where) as fh:
            size = os.fstat(fh.fileno()).st_size

            def read(offset: int, length: int, fh: Any = fh) -> bytes:
                fh.seek(offset)
                return bytes(fh.read(length))

            header = _coords_header(where, size, read)
        _check_coords(where, layer, baseline.seeds, fit, *header)
    return baseline


def read_coords(path: Path, baseline: Baseline, layer: BaselineLayer) -> dict[str, torch.Tensor]:
    """The coordinates of a fitted ``layer`` of the baseline at ``path`` (as loaded by
    :func:`load_baseline`): confined, identified, of the expected tensors and shapes, finite.
    Read whole from one open file, so what is checked is what is used."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if layer.coords is None:
        raise _corrupt(path / BASELINE_FILE, f"{layer.name} has no coordinates")
    where = path / layer.coords
    root = path.resolve()
    with _open_regular(_member(path, root, layer.coords), where) as fh:
        data = bytes(fh.read())
    found, metadata = _coords_header(where, len(data), lambda o, n: data[o : o + n])
    _check_coords(where, layer, baseline.seeds, baseline.fit_settings(), found, metadata)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise _corrupt(where, "not a readable safetensors file") from exc
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise _corrupt(where, f"{name} holds NaN or Inf")
    return tensors


def _corrupt(where: Path, problem: str) -> BaselineError:
    return BaselineError(
        f"{where}: {problem} (tampered or corrupt); re-create the baseline", path=str(where)
    )


def _sha_differs(file: Path) -> BaselineError:
    return _corrupt(file, "sha256 differs from the baseline's manifest")


def _member(path: Path, root: Path, name: object) -> Path:
    """The real path of the file ``name`` (a manifest key, or a layer's coords) of the
    baseline at ``path`` whose real path is ``root``: a plain relative POSIX path (no ``..``,
    nothing absolute, written as the writer writes it) that stays inside ``root`` with every
    symlink resolved. Nothing is opened here."""
    if not isinstance(name, str):
        raise _corrupt(path / MANIFEST_FILE, f"names {name!r}, not a file")
    relative = PurePosixPath(name)
    if (
        not name
        or "\x00" in name
        or "\\" in name
        or relative.is_absolute()
        or ".." in relative.parts
        or relative.as_posix() != name
    ):
        raise _corrupt(path, f"names {name!r}, outside the baseline directory")
    where = path / name
    try:
        real = (root / relative).resolve(strict=True)
    except FileNotFoundError as exc:
        raise _corrupt(where, "missing") from exc
    except (OSError, RuntimeError) as exc:  # a symlink loop, a file used as a directory
        raise _corrupt(where, "cannot be resolved") from exc
    if real == root or not real.is_relative_to(root):
        raise _corrupt(where, "leads outside the baseline directory")
    return real


@contextlib.contextmanager
def _open_regular(file: Path, where: Path) -> Iterator[Any]:
    """``file`` opened for reading only if it is a regular file: identified by ``stat``
    before it is opened, opened non-blocking and identified again (a FIFO swapped in
    between would otherwise block the read forever)."""
    try:
        if not stat.S_ISREG(os.stat(file).st_mode):
            raise _corrupt(where, "not a regular file")
        fd = os.open(file, os.O_RDONLY | _NONBLOCK | _BINARY)
    except OSError as exc:
        raise BaselineError(f"{where}: cannot read ({exc.strerror})", path=str(where)) from exc
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _corrupt(where, "not a regular file")
        yield fh


def _read(path: Path, root: Path, name: str) -> bytes:
    where = path / name
    with _open_regular(_member(path, root, name), where) as fh:
        try:
            return bytes(fh.read())
        except OSError as exc:
            raise BaselineError(f"{where}: cannot read ({exc.strerror})", path=str(where)) from exc


def _sha256(file: Path, where: Path) -> str:
    digest = hashlib.sha256()
    with _open_regular(file, where) as fh:
        while chunk := fh.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _read_manifest(path: Path, root: Path) -> dict[str, str]:
    where = path / MANIFEST_FILE
    raw = _read(path, root, MANIFEST_FILE)
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _corrupt(where, "not a baseline manifest (not JSON)") from exc
    if (
        not isinstance(manifest, dict)
        or BASELINE_FILE not in manifest
        or not all(isinstance(v, str) and _SHA256.fullmatch(v) for v in manifest.values())
    ):
        raise _corrupt(where, "not a baseline manifest")
    return manifest


def _refuse_unlisted(path: Path, root: Path, manifest: Mapping[str, str]) -> None:
    """Every file under coords/ must be in the manifest: coords/ is dynaudit's own and holds
    only what the writer listed, so a file there that the manifest does not vouch for is a sign
    of a hand edit (coordinates dropped in or renamed). Hidden names (.DS_Store, macOS's ._*
    twins on foreign filesystems) are left alone, as is everything beside coords/ (a README,
    Thumbs.db): nothing ever reads them, and refusing them would break baselines that a file
    manager or a user touched harmlessly. Files that are read must be listed (load_baseline)."""
    try:
        entries = sorted(os.listdir(root / COORDS_DIR))
    except FileNotFoundError:
        return  # a baseline without fitted layers; a layer naming a file fails in _member
    except OSError as exc:
        raise BaselineError(f"{path / COORDS_DIR}: cannot read ({exc.strerror})") from exc
    for entry in entries:
        if not entry.startswith(".") and f"{COORDS_DIR}/{entry}" not in manifest:
            raise _corrupt(path / COORDS_DIR / entry, f"not in {MANIFEST_FILE}")


def _refuse_newer(data: bytes, path: Path) -> None:
    """A baseline of a newer format or protocol is refused by name, not as invalid."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        return  # not JSON: the manifest check or the validation says so
    if not isinstance(raw, dict):
        return
    tool = raw.get("tool")
    made_by = tool.get("version") if isinstance(tool, dict) else None
    by = f" (made by dynaudit {made_by[:40]})" if isinstance(made_by, str) else ""
    version = raw.get("format_version", 1)
    if _is_int(version) and version > BASELINE_FORMAT:
        raise BaselineError(
            f"{path}: baseline format {version} is newer than this dynaudit (reads "
            f"{BASELINE_FORMAT}){by}; upgrade dynaudit",
            path=str(path),
        )
    protocol = raw.get("protocol_version")
    if _is_int(protocol) and protocol > PROTOCOL_VERSION:
        raise BaselineError(
            f"{path}: baseline protocol v{protocol} is newer than this dynaudit (reads "
            f"v{PROTOCOL_VERSION}){by}; upgrade dynaudit",
            path=str(path),
        )


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse(data: bytes, path: Path) -> Baseline:
    """baseline.json as a :class:`Baseline`. Python's json (and pydantic) accept NaN,
    Infinity and 1e999; no number a writer produces is one of them, so they are refused."""
    where = path / BASELINE_FILE

    def constant(name: str) -> float:
        raise _corrupt(where, f"holds {name}")

    def number(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise _corrupt(where, f"holds {text[:24]}, not a finite number")
        return value

    try:
        raw = json.loads(data, parse_constant=constant, parse_float=number)
        clean, dropped = strip_unknown(Baseline, raw) if isinstance(raw, dict) else (raw, [])
        if isinstance(clean, dict) and isinstance(clean.get("settings"), dict):
            # a free-form table the schema cannot describe: a newer minor's fit setting
            known = FitSettings.model_fields
            dropped += [f"settings.{k}" for k in clean["settings"] if k not in known]
            clean["settings"] = {k: v for k, v in clean["settings"].items() if k in known}
        baseline = Baseline.model_validate(clean)
    except (ValidationError, ValueError, RecursionError) as exc:
        raise BaselineError(
            f"{where}: not a valid baseline (tampered or corrupt); re-create the baseline",
            path=str(path),
        ) from exc
    warn_ignored(dropped, FORMATS["baseline"], raw, str(where))  # a newer minor's fields
    return baseline


def _check_numbers(baseline: Baseline, path: Path) -> FitSettings:
    """The numbers of baseline.json that comparisons use: its settings, seed count, and per
    layer the shape, scale and per-seed mean distances. Returns the fit settings."""
    where = path / BASELINE_FILE
    try:
        fit = baseline.fit_settings()
    except (ValidationError, TypeError) as exc:
        raise _corrupt(where, "invalid fit settings") from exc
    if baseline.seeds != fit.seeds:
        raise _corrupt(where, f"seeds {baseline.seeds}, its settings say {fit.seeds}")
    names: set[str] = set()
    for layer in baseline.layers:
        if layer.name in names:
            raise _corrupt(where, f"layer {layer.name!r} twice")
        names.add(layer.name)
        if len(layer.shape) != 3 or min(layer.shape) < 1:
            raise _corrupt(where, f"{layer.name}: shape {layer.shape} is not (g, m, n)")
        if layer.scale is not None and not (math.isfinite(layer.scale) and layer.scale >= 0):
            raise _corrupt(where, f"{layer.name}: scale {layer.scale}")
        if layer.digest is not None and not _SHA256.fullmatch(layer.digest):
            raise _corrupt(where, f"{layer.name}: digest {layer.digest[:80]!r} is not a sha256")
        distances = [*layer.cold_mean_distance, *layer.null_mean_distance]
        if not all(math.isfinite(x) for x in distances):
            raise _corrupt(where, f"{layer.name}: a mean distance is NaN or Inf")
        counts = {len(layer.cold_mean_distance), len(layer.null_mean_distance)}
        allowed = {baseline.seeds} if layer.coords is not None else {0, baseline.seeds}
        if len(counts) != 1 or not counts <= allowed:
            raise _corrupt(
                where,
                f"{layer.name}: {len(layer.cold_mean_distance)} cold and "
                f"{len(layer.null_mean_distance)} null mean distances for {baseline.seeds} seeds",
            )
    return fit


Header = tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]


def _coords_header(where: Path, size: int, read: Any) -> Header:
    """(dtype, shape) by tensor name, and the metadata, of a coordinate file's header."""
    try:
        tensors, metadata = parse_header(where, size, read)
    except CorruptCheckpoint as exc:
        raise BaselineError(
            f"{exc.message} (tampered or corrupt); re-create the baseline", path=str(where)
        ) from exc
    return {name: (info.dtype, info.shape) for name, info in tensors.items()}, metadata


def expected_coords(
    layer: BaselineLayer, seeds: int, fit: FitSettings
) -> dict[str, tuple[int, ...]]:
    """The tensors a fitted layer's coordinate file holds, by name, with their shapes:
    ``cold.<k>`` and ``null.<k>`` per seed, (g, H, m' + n', k) over the fitted block m' × n'
    (the whole matrix below ``max_entries``), and the ``sketch`` of its weights (absent from
    baselines made before it)."""
    g, m, n = layer.shape
    rows, cols = block_shape(m, n, fit.max_entries)
    coords = (g, fit.pieces, rows + cols, fit.piece_dim)
    shapes: dict[str, tuple[int, ...]] = {
        f"{kind}.{k}": coords for k in range(seeds) for kind in ("cold", "null")
    }
    shapes[SKETCH] = (g, min(rows, SIDE), min(cols, SIDE))
    return shapes


def _check_coords(
    where: Path,
    layer: BaselineLayer,
    seeds: int,
    fit: FitSettings,
    found: Mapping[str, tuple[str, tuple[int, ...]]],
    metadata: Mapping[str, str],
) -> None:
    owner = metadata.get(LAYER_KEY)
    if owner is not None and owner != layer.name:
        raise _corrupt(where, f"holds the coordinates of {owner!r}, not of {layer.name!r}")
    expected = expected_coords(layer, seeds, fit)
    missing = sorted(set(expected) - set(found) - {SKETCH})
    if missing:
        raise _corrupt(where, f"lacks {missing[0]} ({layer.name} has {seeds} seed(s))")
    for name, (dtype, shape) in sorted(found.items()):
        if name not in expected:
            raise _corrupt(where, f"holds {name!r}, not a tensor of a {seeds}-seed baseline")
        if dtype != COORDS_DTYPE:
            raise _corrupt(where, f"{name} is {dtype}, not {COORDS_DTYPE}")
        if shape != expected[name]:
            size, want = "×".join(map(str, shape)), "×".join(map(str, expected[name]))
            raise _corrupt(where, f"{name} is {size or 'a scalar'}; {layer.name} needs {want}")


def check_settings(baseline: Baseline, requested: dict[str, Any], where: str) -> None:
    """Fit settings given for a comparison must equal the baseline's (they are its settings)."""
    differ = [
        f"{key} {value!r} (baseline: {baseline.settings.get(key)!r})"
        for key, value in requested.items()
        if value is not None and key in baseline.settings and baseline.settings[key] != value
    ]
    if differ:
        raise BaselineError(
            f"{where}: settings differ from the baseline's: {', '.join(differ)}; compare with "
            "the baseline's settings (drop the flags) or re-create the baseline"
        )


def matrix_shapes(checkpoint: Checkpoint, plan: LayerPlan) -> dict[str, list[int]]:
    """(groups, m, n) of every planned layer, from the headers."""
    return {
        layer.name: list(matrix_shape(layer, checkpoint.tensors[layer.source].shape))
        for layer in plan.layers
    }


def check_architecture(
    baseline: Baseline, checkpoint: Checkpoint, plan: LayerPlan, uri: str
) -> None:
    """The checkpoint must have the baseline's layers with the same matrix shapes."""
    ours = matrix_shapes(checkpoint, plan)
    theirs = {layer.name: layer.shape for layer in baseline.layers}
    missing = sorted(set(theirs) - set(ours))
    extra = sorted(set(ours) - set(theirs))
    reshaped = sorted(n for n in set(ours) & set(theirs) if ours[n] != theirs[n])
    problems = []
    if missing:
        problems.append(f"{len(missing)} baseline layer(s) missing (e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} layer(s) not in the baseline (e.g. {extra[0]})")
    if reshaped:
        name = reshaped[0]
        problems.append(f"{name} is {'×'.join(map(str, ours[name]))}, the baseline's "
                        f"{'×'.join(map(str, theirs[name]))}")  # fmt: skip
    if problems:
        raise BaselineError(
            f"{uri}: architecture differs from the baseline ({baseline.source.uri}): "
            + "; ".join(problems)
        )


# -- comparing --------------------------------------------------------------------------

# Sequential seeds (docs/gate.md): a layer's seed-0 figures stand for all K seeds unless a
# verdict lies within a margin of its threshold. The margin of a change c is
# SEQUENTIAL_FACTOR × (the baseline's noise for the layer + CHANGE_SHARE × |c|): the seeds'
# changes differ by about the baseline's own spread, and by a share of the change that grows
# with it (at most 3 % of it in the calibration's damage; docs/gate.md). A displacement's
# margin is DISPLACEMENT_SHARE of the policy's bound (seeds' displacements differed by at most
# 0.033 units where the bound is 0.6).
SEQUENTIAL_FACTOR: Final = 4.0
CHANGE_SHARE: Final = 0.02
DISPLACEMENT_SHARE: Final = 0.25


@dataclass
class _Refits:
    """A layer's warm refits so far, one entry per seed run (seeds 0, 1, … in order), and
    the figures read off seed 0 alone."""

    means: list[float] = field(default_factory=list)
    changes: list[float] = field(default_factory=list)
    absolute: list[float] = field(default_factory=list)
    moved: list[float] = field(default_factory=list)
    fidelity: float | None = None
    weight_change: float | None = None
    noise_likeness: float | None = None


@dataclass
class _Outcome:
    """What comparing one layer gave: a reason for null figures (with the finding it raises),
    bit-equal weights, or refits."""

    reason: str | None = None
    finding: Literal["non_finite", "zeroed"] | None = None
    unchanged: bool = False
    refits: _Refits | None = None
    seconds: float = 0.0


@dataclass
class _Run:
    """What every stage of a comparison shares."""

    checkpoint: Checkpoint
    family: Family
    baseline: Baseline
    root: Path
    device: torch.device
    settings: FitSettings
    by_name: dict[str, BaselineLayer]
    scales: dict[str, float]


def compare_plan(
    checkpoint: Checkpoint,
    plan: LayerPlan,
    family: Family,
    baseline: Baseline,
    root: Path,
    device: torch.device,
    progress: Progress | None = None,
    ranks: Ranks | None = None,
    *,
    policy: Policy | None = None,
    all_seeds: bool = False,
) -> Comparison:
    """Warm-start every changed layer from the baseline's cold fits on this checkpoint's
    weights; a layer whose digest equals the baseline's has change 0 and is not refitted.
    Sequential seeds (unless ``all_seeds``): every changed layer's seed 0 first, then seeds
    1 … K − 1 only for the layers whose verdict under ``policy`` (or whose depth third's or
    the whole model's) lies within its margin of a threshold (:func:`_undecided`). With
    ``ranks`` (a torchrun job), each rank refits its share of each stage and every rank gets
    the whole comparison."""
    chosen = policy or Policy()
    run = _Run(
        checkpoint, family, baseline, root, device, baseline.fit_settings(),
        {layer.name: layer for layer in baseline.layers},
        {layer.name: layer.scale for layer in baseline.layers if layer.scale is not None},
    )  # fmt: skip
    seeds = baseline.seeds
    first = seeds if all_seeds else min(1, seeds)
    mine = _share(plan.layers, run, first, ranks)
    total = len(mine)
    outcomes: dict[str, _Outcome] = {}
    for done, layer in enumerate(mine, start=1):
        outcomes[layer.name] = _first_stage(run, layer, first)
        if progress is not None:
            progress(done, total, layer.name)
    outcomes = _merged(outcomes, ranks)
    groups = layer_groups(plan.layers)
    margins = {
        name: _margin(run.by_name[name], outcome.refits.changes[0], chosen)
        for name, outcome in outcomes.items()
        if outcome.refits is not None and outcome.refits.changes
    }
    more = [] if first == seeds else _undecided(plan.layers, outcomes, margins, run, groups, chosen)
    if more:
        again = _share(more, run, seeds - 1, ranks)
        extended: dict[str, _Outcome] = {}
        for done, layer in enumerate(again, start=total + 1):
            extended[layer.name] = _later_seeds(run, layer, outcomes[layer.name], seeds)
            if progress is not None:
                progress(done, total + len(again), layer.name)
        outcomes.update(_merged(extended, ranks))
    fidelity = {x.name: x.fidelity for x in baseline.report.measured}
    results = [
        _layer_result(layer, run.by_name[layer.name], outcomes[layer.name], groups[layer.name],
                      fidelity.get(layer.name), None if first == seeds else margins.get(layer.name))
        for layer in plan.layers
    ]  # fmt: skip
    return _comparison(plan.layers, results, outcomes, seeds, all_seeds)


def _share(layers: list[Layer], run: _Run, seeds: int, ranks: Ranks | None) -> list[Layer]:
    """This rank's share of ``layers`` (all of them outside a torchrun job), balanced by the
    cost of ``seeds`` warm refits each."""
    if ranks is None:
        return layers
    costs = [_refit_cost(run.by_name[layer.name], run.settings, seeds) for layer in layers]
    owners = assign(costs, ranks.size)
    return [x for x, owner in zip(layers, owners, strict=True) if owner == ranks.rank]


def _merged(outcomes: dict[str, _Outcome], ranks: Ranks | None) -> dict[str, _Outcome]:
    """Every rank's outcomes (this one's alone outside a torchrun job)."""
    if ranks is None:
        return outcomes
    return {name: x for part in ranks.gather(outcomes) for name, x in part.items()}


def _first_stage(run: _Run, layer: Layer, seeds: int) -> _Outcome:
    """Load a layer and settle it: null figures (NaN/Inf, not fitted, all zeros), unchanged
    (its digest is the baseline's), or warm refits from the first ``seeds`` stored cold fits."""
    started = time.perf_counter()
    outcome = _settle(run, layer, seeds)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _settle(run: _Run, layer: Layer, seeds: int) -> _Outcome:
    ref = run.by_name[layer.name]
    loaded = load_layer(run.checkpoint, run.family, layer, run.scales)
    if loaded.non_finite:
        return _Outcome(reason=loaded.reason, finding="non_finite")
    if ref.coords is None:
        return _Outcome(reason=f"not fitted in the baseline ({ref.reason})")
    if loaded.reason is not None:
        return _Outcome(reason=f"damage: {loaded.reason}", finding="zeroed")
    if ref.digest is not None and loaded.digest == ref.digest:
        return _Outcome(unchanged=True)
    refits = _Refits()
    target = loaded.matrices.div_(loaded.scale or 1.0)
    _warm_refits(target, read_coords(run.root, run.baseline, ref), ref, run, range(seeds), refits)
    return _Outcome(refits=refits)


def _later_seeds(run: _Run, layer: Layer, outcome: _Outcome, seeds: int) -> _Outcome:
    """``outcome`` with the warm refits of seeds 1 … ``seeds`` − 1 added (the layer is read
    again: keeping every changed layer in memory between the stages would hold the model)."""
    started = time.perf_counter()
    ref = run.by_name[layer.name]
    assert outcome.refits is not None  # only refitted layers are undecided
    refits = replace(outcome.refits, means=[*outcome.refits.means],
                     changes=[*outcome.refits.changes], absolute=[*outcome.refits.absolute],
                     moved=[*outcome.refits.moved])  # fmt: skip
    loaded = load_layer(run.checkpoint, run.family, layer, run.scales)
    target = loaded.matrices.div_(loaded.scale or 1.0)
    stored = read_coords(run.root, run.baseline, ref)
    _warm_refits(target, stored, ref, run, range(len(refits.changes), seeds), refits)
    return replace(outcome, refits=refits, seconds=outcome.seconds + time.perf_counter() - started)


def _refit_cost(ref: BaselineLayer, settings: FitSettings, seeds: int) -> float:
    """FLOP of ``seeds`` warm refits of a layer."""
    if ref.coords is None:
        return 0.0
    g, m, n = ref.shape
    return g * fit_flop(settings, m, n, warm=True) * seeds


def _warm_refits(
    target: torch.Tensor,
    stored: dict[str, torch.Tensor],
    ref: BaselineLayer,
    run: _Run,
    seeds: range,
    refits: _Refits,
) -> None:
    """Warm-start from the stored cold fits of ``seeds`` on ``target`` (W / s) and add each
    one's figures to ``refits``; seed 0 also gives the fidelity and the weight figures."""
    settings = run.settings
    g, m, n = target.shape
    shape = block_shape(m, n, settings.max_entries)
    steps = warm_steps(settings, *shape)
    for k in seeds:
        cold = stored[f"cold.{k}"].to(run.device)
        null = stored[f"null.{k}"].to(run.device)
        # The rows and columns this seed's cold fit saw (all of them below max_entries).
        blocks = [block_seed(settings.seed + k, ref.name, group) for group in range(g)]
        fitted = to_device(take_blocks(target, shape, blocks), run.device)
        warm = fit_coordinates(fitted, settings, cold, steps=steps, lr=settings.warm_lr)
        _, md = discrepancy(warm)
        new = float(md.mean())
        base = ref.null_mean_distance[k]
        refits.means.append(new)
        refits.absolute.append(new - base)
        refits.changes.append((new - base) / base if base else 0.0)
        refits.moved.append(displacement(warm, null) / base if base else 0.0)
        if k == 0:
            refits.fidelity = float(fidelity_of(warm, fitted).mean())
            if SKETCH in stored:  # an older baseline has none: no weight-change figures
                refits.weight_change, refits.noise_likeness = weight_figures(
                    fitted, stored[SKETCH], ref.name
                )


def _margin(ref: BaselineLayer, change: float, policy: Policy) -> float:
    """How far a layer's mean change over all K seeds may lie from its seed-0 change (module
    constants above): the baseline's own noise for the layer — the relative spread of its K
    cold and of its K null mean distances, its null drift, at least the policy's noise floor
    — plus :data:`CHANGE_SHARE` of the change, times :data:`SEQUENTIAL_FACTOR`."""
    spread = max(_relative_spread(ref.cold_mean_distance), _relative_spread(ref.null_mean_distance))
    noise = max(spread, _null_drift(ref) or 0.0, policy.noise_floor / 100)
    return SEQUENTIAL_FACTOR * (noise + CHANGE_SHARE * abs(change))


def _relative_spread(values: list[float]) -> float:
    if len(values) < 2 or not statistics.fmean(values):
        return 0.0
    return statistics.stdev(values) / abs(statistics.fmean(values))


def _undecided(
    layers: list[Layer],
    outcomes: dict[str, _Outcome],
    margins: dict[str, float],
    run: _Run,
    groups: dict[str, str],
    policy: Policy,
) -> list[Layer]:
    """The refitted layers that need their other seeds, in plan order (every rank of a job
    computes the same list): those whose own verdict is near a threshold, and every refitted
    layer of a scope (all layers, a depth third) whose verdict is. Unchanged layers take part
    in their scopes with change 0 and margin 0."""
    seed0: dict[str, float] = {}
    near: set[str] = set()
    scopes: dict[str, list[str]] = {}
    for layer in layers:
        name, refits = layer.name, outcomes[layer.name].refits
        if refits is not None:
            seed0[name] = refits.changes[0]
            if layer_undecided(refits.changes[0], margins[name], refits.moved[0],
                               DISPLACEMENT_SHARE, policy):  # fmt: skip
                near.add(name)
        if outcomes[name].unchanged or refits is not None:
            scopes.setdefault("all", []).append(name)
            scopes.setdefault(groups[name], []).append(name)
    for scope, names in scopes.items():
        limit = policy.max_drop_all if scope == "all" else policy.max_drop_group
        change = statistics.fmean(seed0.get(name, 0.0) for name in names)
        margin = statistics.fmean(margins.get(name, 0.0) for name in names)
        drift = statistics.fmean(_null_drift(run.by_name[name]) or 0.0 for name in names)
        if scope_undecided(change, drift, margin, limit, policy):
            near.update(name for name in names if name in seed0)
    return [layer for layer in layers if layer.name in near]


def _layer_result(
    layer: Layer,
    ref: BaselineLayer,
    outcome: _Outcome,
    group: str,
    fidelity: float | None,
    margin: float | None,
) -> LayerComparison:
    """A layer's row of the comparison. An unchanged layer has what a refit of the same
    weights gives — change 0, the null refits' mean distance, no displacement, no weight
    change — and the baseline's fidelity."""
    drift = _null_drift(ref)
    figures: dict[str, Any] = {"reason": outcome.reason}
    if outcome.unchanged:
        figures = {
            "mean_distance": _mean(ref.null_mean_distance),
            "change": Change(mean=0.0, std=0.0, absolute=0.0, seeds=len(ref.null_mean_distance)),
            "displacement": 0.0, "noise": drift or 0.0, "fidelity": fidelity,
            "weight_change": 0.0,
        }  # fmt: skip
    elif outcome.refits is not None:
        figures = _figures(outcome.refits, drift)
    return LayerComparison(
        name=layer.name, type=layer.type, depth=layer.depth,
        group=group, shape=ref.shape,
        baseline_mean_distance=_mean(ref.null_mean_distance),
        mean_distance=figures.get("mean_distance"), change=figures.get("change"),
        displacement=figures.get("displacement"), null_drift=drift,
        weight_change=figures.get("weight_change"),
        noise_likeness=figures.get("noise_likeness"),
        noise=figures.get("noise"), fidelity=figures.get("fidelity"),
        reason=figures.get("reason"),
        unchanged=outcome.unchanged if outcome.reason is None else None,
        margin=margin if outcome.refits is not None else None,
        seconds=round(outcome.seconds, 3),
    )  # fmt: skip


def _figures(refits: _Refits, drift: float | None) -> dict[str, Any]:
    """A refitted layer's figures: means over the seeds run, and seed 0's fidelity and
    weight figures."""
    changes = refits.changes
    std = statistics.stdev(changes) if len(changes) > 1 else 0.0
    change = Change(
        mean=statistics.fmean(changes), std=std, absolute=statistics.fmean(refits.absolute),
        seeds=len(changes),
    )  # fmt: skip
    return {
        "mean_distance": statistics.fmean(refits.means),
        "change": change,
        "displacement": statistics.fmean(refits.moved),
        "noise": max(std, drift or 0.0),
        "fidelity": refits.fidelity,
        "weight_change": refits.weight_change,
        "noise_likeness": refits.noise_likeness,
    }


def _comparison(
    layers: list[Layer],
    results: list[LayerComparison],
    outcomes: dict[str, _Outcome],
    seeds: int,
    all_seeds: bool,
) -> Comparison:
    """The per-layer rows with their groups, findings and refit counts."""
    per_seed = {
        name: x.refits.changes if x.refits is not None else [0.0] * seeds
        for name, x in outcomes.items()
        if x.unchanged or x.refits is not None
    }
    by_group: dict[str, list[LayerComparison]] = {}  # one pass: a scan per type was quadratic
    by_type: dict[str, list[LayerComparison]] = {}  # (a generic checkpoint has a type per layer)
    for r in results:
        by_group.setdefault(r.group, []).append(r)
        by_type.setdefault(r.type, []).append(r)
    return Comparison(
        layers=results,
        all=_group(results, per_seed),
        groups={g: _group(by_group[g], per_seed) for g in DEPTH_GROUPS if g in by_group},
        types={t: _group(by_type[t], per_seed) for t in sorted(by_type)},
        non_finite=[x.name for x in layers if outcomes[x.name].finding == "non_finite"],
        zeroed=[x.name for x in layers if outcomes[x.name].finding == "zeroed"],
        unchanged=[x.name for x in layers if outcomes[x.name].unchanged],
        refits=sum(len(x.refits.changes) for x in outcomes.values() if x.refits is not None),
        refits_full=seeds * len(per_seed),
        seed_rule="all" if all_seeds else "sequential",
    )


def displacement(coords: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean distance a neuron moved from ``reference``, after aligning each piece by
    translation and rotation (distances are invariant to both), averaged over matrices."""
    a = coords.double() - coords.double().mean(dim=2, keepdim=True)
    b = reference.double() - reference.double().mean(dim=2, keepdim=True)
    u, _, vh = torch.linalg.svd(a.mT @ b)  # (g, H, k, k): orthogonal Procrustes per piece
    aligned = a @ (u @ vh)
    per_neuron = (aligned - b).pow(2).sum(dim=(1, 3)).sqrt()  # (g, N), over pieces and dims
    return float(per_neuron.mean())


def _null_drift(ref: BaselineLayer) -> float | None:
    pairs = list(zip(ref.cold_mean_distance, ref.null_mean_distance, strict=False))
    if not pairs:
        return None
    return statistics.fmean(abs(null - cold) / cold for cold, null in pairs if cold)


def _group(layers: list[LayerComparison], per_seed: dict[str, list[float]]) -> GroupComparison:
    """A group's change is the mean of its layers' relative changes, per seed, over the seeds
    every member has (sequential seeds refit some layers once: then seed 0 alone); mean ± std
    over those seeds. Its noise is the larger of that std and the mean null drift of its
    layers."""
    measured = [layer for layer in layers if layer.name in per_seed]
    if not measured:
        return GroupComparison(layers=0, change=None, noise=None, displacement=None)
    seeds = min(len(per_seed[x.name]) for x in measured)
    by_seed = [statistics.fmean(per_seed[x.name][k] for x in measured) for k in range(seeds)]
    std = statistics.stdev(by_seed) if seeds > 1 else 0.0
    absolute = statistics.fmean(x.change.absolute for x in measured if x.change is not None)
    drift = statistics.fmean(x.null_drift or 0.0 for x in measured)
    moved = [x.displacement for x in measured if x.displacement is not None]
    return GroupComparison(
        layers=len(measured),
        change=Change(mean=statistics.fmean(by_seed), std=std, absolute=absolute, seeds=seeds),
        noise=max(std, drift),
        displacement=max(moved) if moved else None,
    )


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None
