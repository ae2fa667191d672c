"""The baseline store: writing, verifying and loading a baseline directory (docs/gate.md).

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
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, TypeGuard

import torch
from pydantic import ValidationError

from dynaudit.config import PROTOCOL_VERSION, FitSettings, project_setting
from dynaudit.dynamics import discrepancy, fit_coordinates
from dynaudit.dynamics.blocks import block_shape
from dynaudit.dynamics.kernel import warm_steps
from dynaudit.dynamics.sketch import SIDE, sketch
from dynaudit.errors import BaselineError, CorruptCheckpoint, UsageError
from dynaudit.families import Layer, LayerPlan
from dynaudit.families.base import matrix_shape
from dynaudit.files import publish_dir, stage_dir, write_new
from dynaudit.schema import BASELINE_FORMAT, Baseline, BaselineLayer
from dynaudit.schemas import FORMATS, strip_unknown, warn_ignored
from dynaudit.sources.base import SourceOptions
from dynaudit.tensors import Checkpoint, parse_header, present, read_json, read_text

__all__ = [
    "BaselineWriter",
    "CoordsSink",
    "check_architecture",
    "check_settings",
    "find_baseline",
    "is_baseline",
    "load_baseline",
    "matrix_shapes",
    "read_coords",
    "refuse_existing",
    "staging_for",
]

BASELINE_FILE = "baseline.json"
MANIFEST_FILE = "manifest.json"
COORDS_DIR = "coords"
# Written in each coordinate file's safetensors metadata: which layer it belongs to.
LAYER_KEY = "dynaudit.layer"


# Called after each cold fit of a batch: (layers, owner of each matrix, seed offset, coords
# (b, H, m + n, k), target W/s (b, m, n)). A baseline writer keeps the
# coordinates through it (:attr:`BaselineWriter.sink`).
CoordsSink = Callable[[list[Layer], list[int], int, torch.Tensor, torch.Tensor], None]
# A writer's files, cold and null mean distances, by layer (exchanged between ranks).
Records = tuple[dict[str, str], dict[str, list[float]], dict[str, list[float]]]


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
            target,
            self.settings,
            coords,
            steps=warm_steps(self.settings, m, n),
            lr=self.settings.warm_lr,
        )
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
        write_new(self.staging / BASELINE_FILE, baseline.model_dump_json(indent=1).encode())
        manifest = {
            path.relative_to(self.staging).as_posix(): _sha256(path, path)
            for path in sorted(self.staging.rglob("*"))
            if path.is_file()
        }
        write_new(self.staging / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
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
    """A fresh staging directory beside ``out`` (:func:`dynaudit.files.stage_dir`), created
    with its ``coords/``; ``out`` must not exist."""
    refuse_existing(out)
    staging = stage_dir(out)
    (staging / COORDS_DIR).mkdir()
    return staging


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
        problems.append(
            f"{name} is {'×'.join(map(str, ours[name]))}, the baseline's "
            f"{'×'.join(map(str, theirs[name]))}"
        )
    if problems:
        raise BaselineError(
            f"{uri}: architecture differs from the baseline ({baseline.source.uri}): "
            + "; ".join(problems)
        )


def find_baseline(
    checkpoint: Path,
    base: str | os.PathLike[str] | None,
    source: str = "",
    options: SourceOptions | None = None,
    *,
    read_pyproject: bool = True,
) -> tuple[str, str]:
    """The baseline of a checkpoint when none is given (README, "In CI"): ``[tool.dynaudit]
    baseline`` in ./pyproject.toml, else what the checkpoint declares — ``--base``, the MLflow
    model version's ``dynaudit.baseline`` tag, an adapter's ``base_model_name_or_path``, the
    model card's ``base_model``. The tag comes before the files: it is set on this very
    version to name the baseline it is gated on, where a card's ``base_model`` only says where
    the weights came from (often a public model a private registry cannot reach)."""
    configured = project_setting("baseline") if read_pyproject else None
    if isinstance(configured, str) and configured:
        return configured, "[tool.dynaudit] baseline in pyproject.toml"
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    adapter = folder / "adapter_config.json"
    if base is not None:
        return os.fspath(base), "--base (the adapter's base model)"
    if source.startswith("models:/"):
        from dynaudit.sources.mlflow import declared_baseline

        tagged = declared_baseline(source, (options or SourceOptions()).mlflow_uri)
        if tagged:
            return tagged, "the MLflow model version's dynaudit.baseline tag"
    if present(adapter, "adapter_config.json"):
        config = read_json(adapter)
        named = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        if isinstance(named, str) and named:
            return named, "the adapter's base_model_name_or_path"
    card = folder / "README.md"
    if present(card, "the model card (README.md)"):
        from dynaudit.sources.hub import card_base_model  # huggingface_hub's ModelCard

        named = card_base_model(read_text(card, "the model card (README.md)"), str(card))
        if named:
            return named, "the model card's base_model"
    raise UsageError(
        f"{checkpoint}: no baseline given and none declared; pass --baseline REF (a baseline "
        "directory or the base checkpoint), or set `baseline` under [tool.dynaudit] in "
        "pyproject.toml"
    )
