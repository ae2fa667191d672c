"""The library's one facade: :func:`measure`, :func:`inspect`, :func:`baseline`, :func:`check`
and :func:`compare`. The CLI calls nothing else; each function opens its SOURCE, hands the
opened checkpoint to the engine, and returns one of the models of :mod:`dynaudit.schema`."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from dynaudit._version import __version__
from dynaudit.baseline_store import (
    find_baseline,
    is_baseline,
    load_baseline,
    refuse_existing,
)
from dynaudit.config import PROTOCOL_VERSION, FitSettings
from dynaudit.distributed import Ranks, current, require_single_process
from dynaudit.engine import Progress, fit_report
from dynaudit.engine.baseline import write_baseline
from dynaudit.engine.compare import Compared, compare_checkpoint
from dynaudit.engine.plan import (
    Job,
    experts_of,
    plan_checkpoint,
    settings_from,
    source_info_of,
)
from dynaudit.errors import BaselineError, UnauditedWeights, UsageError, listed
from dynaudit.families import detect_family
from dynaudit.files import discard_dir
from dynaudit.gate import decide
from dynaudit.schema import (
    Baseline,
    BaselineInfo,
    CacheInfo,
    CheckReport,
    Inspection,
    Policy,
    Report,
    SourceInfo,
    envelope,
)
from dynaudit.sources import SourceOptions, open_checkpoint, open_headers, resolve
from dynaudit.tensors import Checkpoint, sha256_file

if TYPE_CHECKING:
    from dynaudit.cache import ResultCache

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # the backport of PEP 692's **kwargs typing
    from typing_extensions import Unpack

__all__ = [
    "DEFAULT_BASELINE_SEEDS",
    "CheckOptions",
    "FitOptions",
    "baseline",
    "check",
    "compare",
    "inspect",
    "measure",
]

log = logging.getLogger(__name__)

DEFAULT_BASELINE_SEEDS = 3  # K cold fits per layer (docs/gate.md: "default ≥ 3")


class FitOptions(TypedDict, total=False):
    """The fit settings every entry point takes as keywords: the fields of
    :class:`~dynaudit.config.FitSettings`, which validates them (a bad value is a usage
    error, exit 2). None keeps the default, as a missing key does: the CLI passes None for an
    option left out. ``device`` is text because the CLI passes its flag through; FitSettings
    accepts ``auto``, ``cpu`` or ``cuda``."""

    q_dim: int | None
    pieces: int | None
    mu: float | None
    steps: int | None
    lr: float | None
    warm_steps: int | None
    warm_lr: float | None
    seed: int | None
    seeds: int | None
    max_entries: int | None
    device: str | None
    threads: int | None
    tile_bytes: int | None


class CheckOptions(FitOptions, total=False):
    """The keywords of :func:`check`, which :func:`compare` passes on."""

    policy: Policy | None
    family: str | None
    base: str | os.PathLike[str] | None
    sources: SourceOptions | None
    progress: Progress | None
    cache: bool
    all_seeds: bool
    baseline_from: str
    read_pyproject: bool


def measure(
    source: str | os.PathLike[str],
    *,
    family: str | None = None,
    base: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    scales: dict[str, float] | None = None,
    sources: SourceOptions | None = None,
    cache: bool = True,
    layers: str | None = None,
    experts: str | Collection[int] | None = None,
    **settings: Unpack[FitOptions],
) -> Report:
    """Fit every layer of a checkpoint and report its dynamical discrepancy.

    ``source`` is any SOURCE form (docs/sources.md): a local path, ``hf://org/name[@rev]`` or
    ``org/name``, ``models:/…`` or ``runs:/…``; ``sources`` says how to reach remote ones.
    ``settings`` are :class:`~dynaudit.config.FitSettings` fields (``q_dim``, ``pieces``, ``steps``,
    ``seed``, ``seeds``, ``device``, ...). A LoRA adapter directory is measured as its merged
    weights over ``base`` (default: the adapter's ``base_model_name_or_path``). ``scales`` fixes the
    per-layer reference scale s (by layer name); by default each matrix is scaled by its own RMS.
    With ``cache`` (the default), a checkpoint already measured with the same settings is not fitted
    again: the stored report is returned, marked as a cache hit. ``layers``, a regular expression,
    measures only the layers whose names it matches (the others are listed as skipped).
    ``experts`` (indices, or text such as ``"0,3"`` or ``"0-7"``) measures only those experts of
    a mixture of experts, in every block; with ``layers`` too, the layers both select.
    """
    from dynaudit.cache import ResultCache, cache_root
    from dynaudit.runtime import pick_device

    fit = settings_from(settings)
    chosen = None if experts is None else experts_of(experts)  # a usage error before any work
    options = sources or SourceOptions()
    started = time.perf_counter()
    ranks = current()  # a torchrun job: joined before any device is chosen
    resolved = resolve(source, options)
    device = pick_device(fit.device)
    store = ResultCache(cache_root(options.cache_dir)) if cache else None
    # Without the cache's memo, still hash each file once (a download is verified, then
    # fingerprinted).
    digest = store.digest if store else functools.cache(sha256_file)
    with open_checkpoint(resolved, base, options, digest) as checkpoint:
        fingerprint = checkpoint.fingerprint(digest)
        source_info = source_info_of(resolved, checkpoint, fingerprint)
        selection: dict[str, Any] = {"layers": layers}
        if chosen is not None:  # keeps the keys of reports without it as they were
            selection["experts"] = chosen
        key = _result_key(checkpoint, fingerprint, fit, family, scales, selection)
        cached = _cached_report(store, key, ranks)
        if cached is not None:
            return _as_hit(cached, source_info, key, started)
        planned = plan_checkpoint(checkpoint, family, layers, chosen)
        job = Job(device, progress, ranks)
        report = fit_report(planned, source_info, fit, job, scales=scales, started=started)
    return _kept(report, store, key, ranks)


def _result_key(
    checkpoint: Checkpoint,
    fingerprint: dict[str, str],
    fit: FitSettings,
    family: str | None,
    scales: dict[str, float] | None,
    context: dict[str, Any],
) -> str:
    """The result cache's key of a report (or, with ``context["kind"]``, a baseline) of this
    checkpoint: its files, the settings, and what else it depends on (:func:`_cache_context`
    and ``context``)."""
    from dynaudit.cache import result_key

    return result_key(
        fingerprint,
        fit.numeric(),
        family=family,
        scales=scales,
        version=__version__,
        protocol=PROTOCOL_VERSION,
        context={**_cache_context(checkpoint), **context},
    )


def _cached_report(store: ResultCache | None, key: str, ranks: Ranks | None) -> Report | None:
    """The stored report under ``key``; in a torchrun job, rank 0's answer for every rank."""
    cached = store.load(key) if store else None
    if ranks is not None:  # rank 0's cache decides for the whole job
        cached = ranks.from_main(cached)
    return cached


def _kept(report: Report, store: ResultCache | None, key: str, ranks: Ranks | None) -> Report:
    """A new report, stored in the cache under ``key`` (by rank 0 alone in a torchrun job)
    and marked as a cache miss; without a cache, the report as it is."""
    if store is None or (ranks is not None and not ranks.is_main):
        return report
    report = report.model_copy(
        update={"cache": CacheInfo(hit=False, key=key, measured_at=report.created_at)}
    )
    store.store(key, report)
    return report


def _as_hit(cached: Report, source_info: SourceInfo, key: str, started: float) -> Report:
    """A cached report as this call's answer: its source as given now, marked as a hit."""
    return cached.model_copy(
        update={
            "source": source_info,
            "cache": CacheInfo(hit=True, key=key, measured_at=cached.created_at),
            "seconds": round(time.perf_counter() - started, 3),
        }
    )


def inspect(
    source: str | os.PathLike[str],
    *,
    family: str | None = None,
    base: str | os.PathLike[str] | None = None,
    weights: bool = False,
    sources: SourceOptions | None = None,
    rank_work: int | None = None,
    **settings: Unpack[FitOptions],
) -> Inspection:
    """Headers only: family, layer graph, shapes, dtypes, size, structural class and the fit's
    cost. With ``weights=True`` also reads every layer for its rank and spectral norm, the
    degenerate layers and the gain of every residual branch. A Hub model's headers are read
    with ranged requests: no weights are downloaded unless ``weights=True``. Ranks are
    computed for matrices whose ``m·n·min(m, n)`` is at most ``rank_work`` (default
    :data:`dynaudit.structure.RANK_WORK`, 4096³); larger ones get an estimated spectral norm
    and are listed as ``unranked``."""
    from dynaudit.structure import inspect_checkpoint

    fit = settings_from(settings)
    options = sources or SourceOptions()
    remote = None if weights or base is not None else open_headers(source, options)
    if remote is not None:
        uri, opened = remote
    else:
        resolved = resolve(source, options)
        uri, opened = resolved.uri, open_checkpoint(resolved, base, options)
    with opened as checkpoint:
        detection = detect_family(checkpoint, family)
        return inspect_checkpoint(
            checkpoint, uri, detection, fit, weights=weights, rank_work=rank_work
        )


def _baseline_settings(settings: Mapping[str, object]) -> Mapping[str, object]:
    """``settings`` with K = DEFAULT_BASELINE_SEEDS unless given (the CLI passes None for an
    option left out: that is not given either)."""
    if settings.get("seeds") is None:
        return {**settings, "seeds": DEFAULT_BASELINE_SEEDS}
    return settings


def baseline(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    family: str | None = None,
    base: str | os.PathLike[str] | None = None,
    sources: SourceOptions | None = None,
    progress: Progress | None = None,
    mlflow: bool = False,
    experiment: str | None = None,
    **settings: Unpack[FitOptions],
) -> Baseline:
    """Measure ``source`` with K cold fits and their null refits and store it as a baseline
    directory at ``out`` (written atomically; an existing ``out`` is never overwritten), and/or
    with ``mlflow`` as the artifacts of a new MLflow run (``Baseline.stored_at`` says where)."""
    if out is None and not mlflow:
        raise UsageError("a baseline needs --out DIR, --mlflow, or both")
    if out is None:
        require_single_process("baseline --mlflow without --out")  # one temporary dir per rank
        with tempfile.TemporaryDirectory(prefix="dynaudit-baseline-") as tmp:
            return baseline(
                source,
                Path(tmp) / "baseline",
                family=family,
                base=base,
                sources=sources,
                progress=progress,
                mlflow=True,
                experiment=experiment,
                **settings,
            )
    fit = settings_from(_baseline_settings(settings))
    options = sources or SourceOptions()
    started = time.perf_counter()
    target = Path(out)
    refuse_existing(target)  # before any work
    ranks = current()  # a torchrun job: each rank fits its share of the layers
    resolved = resolve(source, options)
    digest = _file_digest(options)
    with open_checkpoint(resolved, base, options, digest) as checkpoint:
        made = write_baseline(
            checkpoint,
            resolved,
            target,
            fit,
            family=family,
            digest=digest,
            progress=progress,
            started=started,
            ranks=ranks,
        )
    if ranks is not None and not ranks.is_main:
        return made  # rank 0 stores and reports
    return _store(made, target, options, mlflow, experiment)


def _store(
    made: Baseline, target: Path, options: SourceOptions, mlflow: bool, experiment: str | None
) -> Baseline:
    """The baseline written at ``target``, also stored in a new MLflow run with ``mlflow``;
    ``stored_at`` says where it is kept."""
    if not mlflow:
        return made.model_copy(update={"stored_at": str(target)})
    from dynaudit.sources.mlflow import store_baseline

    ref = store_baseline(
        target,
        made.source.uri,
        tracking_uri=options.mlflow_uri,
        experiment=experiment,
        revision=made.source.revision,
    )
    return made.model_copy(update={"stored_at": ref})


def _file_digest(options: SourceOptions) -> Callable[[Path], str]:
    """sha256 of a file, remembered in the cache's hash memo (an unchanged multi-GB checkpoint
    is hashed once across measure, baseline and check)."""
    from dynaudit.cache import ResultCache, cache_root

    return ResultCache(cache_root(options.cache_dir)).digest


def check(
    source: str | os.PathLike[str],
    baseline_ref: str | os.PathLike[str] | None = None,
    *,
    policy: Policy | None = None,
    family: str | None = None,
    base: str | os.PathLike[str] | None = None,
    sources: SourceOptions | None = None,
    progress: Progress | None = None,
    cache: bool = True,
    all_seeds: bool = False,
    baseline_from: str = "--baseline",
    read_pyproject: bool = True,
    **settings: Unpack[FitOptions],
) -> CheckReport:
    """Compare ``source`` with a baseline (a baseline directory, or any checkpoint SOURCE,
    measured on the fly) and decide the gate. Without ``baseline_ref`` the baseline is found
    as docs/gate.md says (:func:`find_baseline`). ``settings`` may only repeat the baseline's
    (``device`` and ``threads`` are free); ``baseline_from`` says where ``baseline_ref`` came
    from, for the report; ``read_pyproject=False`` (a ``--config`` file in use) keeps
    ./pyproject.toml out of the search. A baseline measured on the fly is kept in the cache
    for the next check (``cache=False``: measured into a temporary directory and dropped).

    Layers whose bytes equal the baseline's are not refitted; of the others, seed 0 is
    refitted first and the other K − 1 seeds only where a verdict under ``policy`` is near a
    threshold (docs/gate.md); ``all_seeds`` refits every seed of every changed layer."""
    options = sources or SourceOptions()
    chosen = policy or Policy()  # before the comparison: sequential seeds depend on it
    started = time.perf_counter()
    resolved = resolve(source, options)
    digest = _file_digest(options)
    # The candidate is opened (every file identified, the weights chosen) before a baseline
    # is found or measured: a bad candidate fails at once.
    with open_checkpoint(resolved, base, options, digest) as checkpoint:
        _require_audited(checkpoint, resolved.uri)
        source_info = source_info_of(resolved, checkpoint, checkpoint.fingerprint(digest))
        if baseline_ref is None:
            ref, found_from = find_baseline(
                resolved.path, base, os.fspath(source), options, read_pyproject=read_pyproject
            )
        else:
            ref, found_from = os.fspath(baseline_ref), baseline_from
        log.info("baseline %s (%s)", ref, found_from)
        with _baseline_at(ref, options, settings, cache) as (stored, root, kept):
            info = _baseline_info(ref, found_from, stored, kept)
            compared = compare_checkpoint(
                checkpoint,
                resolved.uri,
                stored,
                root,
                ref=ref,
                family=family,
                settings=settings,
                policy=chosen,
                all_seeds=all_seeds,
                progress=progress,
            )
    return _check_report(source_info, info, compared, chosen, started)


def _require_audited(checkpoint: Checkpoint, uri: str) -> None:
    """Refuse a candidate holding weight files that transformers' ``from_pretrained`` would
    load and the audit would not read: a gate must not pass weights it never saw."""
    unread = checkpoint.unread_weights()
    if unread:
        raise UnauditedWeights(
            f"{uri}: transformers would load weight files the audit did not read "
            f"({listed(unread)}); "
            "audit the directory itself, or remove the files that are not the model",
            path=str(checkpoint.root),
            uri=uri,
        )


def _baseline_info(ref: str, found_from: str, stored: Baseline, kept: bool) -> BaselineInfo:
    """The check report's ``baseline``: which one, found how, and whether it is kept."""
    return BaselineInfo(
        ref=str(ref),
        resolved_from=found_from,
        source=stored.source,
        created_at=stored.created_at,
        seeds=stored.seeds,
        stored=kept,
    )


def _check_report(
    source: SourceInfo, info: BaselineInfo, compared: Compared, policy: Policy, started: float
) -> CheckReport:
    """The check report: the comparison and the gate's verdict under ``policy``."""
    return CheckReport(
        **envelope(source),
        baseline=info,
        family=compared.family,
        settings=compared.settings,
        policy=policy,
        comparison=compared.comparison,
        verdict=decide(compared.comparison, policy),
        seconds=round(time.perf_counter() - started, 3),
    )


def compare(
    a: str | os.PathLike[str], b: str | os.PathLike[str], **kwargs: Unpack[CheckOptions]
) -> CheckReport:
    """``check(b, baseline=a)``: two checkpoints, A measured on the fly as the baseline."""
    return check(b, a, **kwargs)


@contextlib.contextmanager
def _baseline_at(
    ref: str, options: SourceOptions, settings: FitOptions, cache: bool
) -> Iterator[tuple[Baseline, Path, bool]]:
    """A stored baseline directory, or one made from a checkpoint on the fly (kept in the
    cache unless ``cache`` is False)."""
    path = Path(ref).expanduser()
    if is_baseline(path):
        yield load_baseline(path), path, True
        return
    if ref.startswith("runs:/"):
        from dynaudit.sources.mlflow import fetch_baseline

        with tempfile.TemporaryDirectory(prefix="dynaudit-baseline-") as tmp:
            fetched = fetch_baseline(ref, Path(tmp), options.mlflow_uri)
            if is_baseline(fetched):
                yield load_baseline(fetched), fetched, True
                return
        # not a stored baseline: a checkpoint logged in a run, measured on the fly below
    require_single_process("check against a checkpoint (its baseline is measured first)")
    cached = _cached_baseline(ref, options, settings) if cache else None
    if cached is not None:
        yield *cached, False
        return
    with tempfile.TemporaryDirectory(prefix="dynaudit-baseline-") as tmp:
        made = Path(tmp) / "baseline"
        log.info("measuring the baseline %s (not kept: --no-cache or no writable cache)", ref)
        baseline(ref, made, sources=options, **settings)
        yield load_baseline(made), made, False


def _cached_baseline(
    ref: str, options: SourceOptions, settings: FitOptions
) -> tuple[Baseline, Path] | None:
    """The baseline of checkpoint ``ref`` in the cache (``<cache>/baselines/<key>``), made
    there first if needed: a CI job checking against the same base measures it once. The key
    is the result cache's (file sha256s, settings, config, plugins, versions). None when the
    cache cannot be written (the caller measures into a temporary directory)."""
    from dynaudit.cache import cache_root

    fit = settings_from(_baseline_settings(settings))
    resolved = resolve(ref, options)
    digest = _file_digest(options)
    with open_checkpoint(resolved, None, options, digest) as checkpoint:
        fingerprint = checkpoint.fingerprint(digest)
        key = _result_key(checkpoint, fingerprint, fit, None, None, {"kind": "baseline"})
        entry = cache_root(options.cache_dir) / "baselines" / key[:2] / key
        if is_baseline(entry):
            try:
                log.info("reusing the cached baseline of %s at %s", ref, entry)
                return load_baseline(entry), entry
            except BaselineError as exc:
                log.warning("remaking a damaged cached baseline: %s", exc)
                discard_dir(entry)
        if not _writable(entry.parent):
            return None
        log.info("measuring the baseline of %s into the cache at %s", ref, entry)
        try:
            made = write_baseline(checkpoint, resolved, entry, fit, family=None, digest=digest)
        except UsageError:
            if not is_baseline(entry):  # not a lost race with another process: a real error
                raise
            return load_baseline(entry), entry
    return made, entry


def _writable(folder: Path) -> bool:
    """``folder`` exists (made if needed) and can be written; a warning says why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("could not write the baseline cache at %s: %s", folder, exc)
        return False
    if not os.access(folder, os.W_OK):
        log.warning("the baseline cache at %s is not writable", folder)
        return False
    return True


def _cache_context(checkpoint: Checkpoint) -> dict[str, Any]:
    """Besides the weight files, what a report depends on: the config the family plugins read,
    how an adapter is merged, which plugins are installed (they decide the family), and which
    key of a training checkpoint holds the weights (one safetensors file, several keys)."""
    from dynaudit.families import available_families
    from dynaudit.sources.adapters import AdapterCheckpoint

    merge = checkpoint.merge_plan() if isinstance(checkpoint, AdapterCheckpoint) else None
    context: dict[str, Any] = {
        "config": checkpoint.config,
        "merge": merge,
        "plugins": available_families(),
    }
    if checkpoint.weights_note is not None:  # absent otherwise: other keys stay as they were
        context["weights"] = checkpoint.weights_note
    return context
