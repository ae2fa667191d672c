"""The library's one facade: :func:`measure`, :func:`inspect`, :func:`baseline`, :func:`check`
and :func:`compare`. The CLI calls nothing else; each function opens its SOURCE, hands the
opened checkpoint to the engine, and returns one of the models of :mod:`dynaudit.schema`."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dynaudit import __version__
from dynaudit.baseline_store import (
    BaselineWriter,
    check_architecture,
    check_settings,
    discard,
    find_baseline,
    is_baseline,
    load_baseline,
    matrix_shapes,
    refuse_existing,
    staging_for,
)
from dynaudit.config import PROTOCOL_VERSION, FitSettings
from dynaudit.distributed import Ranks, current, require_single_process
from dynaudit.engine import Progress, compare_plan, fit_report
from dynaudit.engine.plan import family_info, plan_checkpoint, require_layers, settings_from
from dynaudit.errors import BaselineError, DynauditError, UnauditedWeights, UsageError
from dynaudit.families import Detection, detect_family
from dynaudit.gate import decide
from dynaudit.schema import (
    Baseline,
    BaselineInfo,
    BaselineLayer,
    CacheInfo,
    CheckReport,
    Inspection,
    LayerResult,
    Policy,
    Report,
    SourceInfo,
)
from dynaudit.sources import SourceOptions, open_checkpoint, open_headers, resolve
from dynaudit.sources.base import ResolvedSource
from dynaudit.tensors import Checkpoint, sha256_file

__all__ = ["DEFAULT_BASELINE_SEEDS", "baseline", "check", "compare", "inspect", "measure"]

log = logging.getLogger(__name__)

DEFAULT_BASELINE_SEEDS = 3  # K cold fits per layer (docs/gate.md: "default ≥ 3")


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
    **settings: Any,
) -> Report:
    """Fit every layer of a checkpoint and report its dynamical discrepancy.

    ``source`` is any SPEC §3 form: a local path, ``hf://org/name[@rev]`` or ``org/name``,
    ``models:/…`` or ``runs:/…``; ``sources`` says how to reach remote ones. ``settings``
    are :class:`~dynaudit.config.FitSettings` fields (``q_dim``, ``pieces``, ``steps``,
    ``seed``, ``seeds``, ``device``, ...). A LoRA adapter directory is measured as its merged
    weights over ``base`` (default: the adapter's ``base_model_name_or_path``). ``scales``
    fixes the per-layer reference scale s (by layer name); by default each matrix is scaled by
    its own RMS. With ``cache`` (the default), a checkpoint already measured with the same
    settings is not fitted again: the stored report is returned, marked as a cache hit.
    ``layers``, a regular expression, measures only the layers whose names it matches (the
    others are listed as skipped).
    """
    from dynaudit.cache import ResultCache, cache_root, result_key
    from dynaudit.runtime import pick_device

    fit = settings_from(settings)
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
        source_info = SourceInfo(
            uri=resolved.uri, path=str(resolved.path), revision=resolved.revision,
            files=fingerprint, selection=checkpoint.selection_note,
        )  # fmt: skip
        key = result_key(
            fingerprint, fit.numeric(), family=family, scales=scales, version=__version__,
            protocol=PROTOCOL_VERSION, context={**cache_context(checkpoint), "layers": layers},
        )  # fmt: skip
        cached = store.load(key) if store else None
        if ranks is not None:  # rank 0's cache decides for the whole job
            cached = ranks.from_main(cached)
        if cached is not None:
            return cached.model_copy(
                update={
                    "source": source_info,
                    "cache": CacheInfo(hit=True, key=key, measured_at=cached.created_at),
                    "seconds": round(time.perf_counter() - started, 3),
                }
            )
        detection, plan = plan_checkpoint(checkpoint, family, layers)
        report = fit_report(
            checkpoint, source_info, detection, plan, fit, device, scales=scales,
            progress=progress, started=started, ranks=ranks,
        )  # fmt: skip
    if store is not None and (ranks is None or ranks.is_main):
        report = report.model_copy(
            update={"cache": CacheInfo(hit=False, key=key, measured_at=report.created_at)}
        )
        store.store(key, report)
    return report


def inspect(
    source: str | os.PathLike[str],
    *,
    family: str | None = None,
    base: str | os.PathLike[str] | None = None,
    weights: bool = False,
    sources: SourceOptions | None = None,
    rank_work: int | None = None,
    **settings: Any,
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


def _baseline_settings(settings: dict[str, Any]) -> dict[str, Any]:
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
    **settings: Any,
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
                source, Path(tmp) / "baseline", family=family, base=base, sources=sources,
                progress=progress, mlflow=True, experiment=experiment, **settings,
            )  # fmt: skip
    fit = settings_from(_baseline_settings(settings))
    options = sources or SourceOptions()
    started = time.perf_counter()
    target = Path(out)
    refuse_existing(target)  # before any work
    ranks = current()  # a torchrun job: each rank fits its share of the layers
    resolved = resolve(source, options)
    digest = _file_digest(options)
    with open_checkpoint(resolved, base, options, digest) as checkpoint:
        made = _write_baseline(
            checkpoint, resolved, target, fit, family=family, digest=digest, progress=progress,
            started=started, ranks=ranks,
        )  # fmt: skip
    if ranks is not None and not ranks.is_main:
        return made  # rank 0 stores and reports
    if mlflow:
        from dynaudit.tracking import store_baseline

        ref = store_baseline(
            target, made.source.uri, tracking_uri=options.mlflow_uri, experiment=experiment,
            revision=made.source.revision,
        )  # fmt: skip
        made = made.model_copy(update={"stored_at": ref})
    else:
        made = made.model_copy(update={"stored_at": str(target)})
    return made


def _write_baseline(
    checkpoint: Checkpoint,
    resolved: ResolvedSource,
    target: Path,
    fit: FitSettings,
    *,
    family: str | None,
    digest: Callable[[Path], str],
    progress: Progress | None = None,
    started: float | None = None,
    ranks: Ranks | None = None,
) -> Baseline:
    """Measure an opened checkpoint into a new baseline directory ``target``, staged beside it
    and renamed into place: an interruption or an error leaves nothing behind. With ``ranks``
    (a torchrun job) each rank fits its share into rank 0's staging directory, which must be
    on a filesystem every rank sees, and rank 0 completes and renames it."""
    from dynaudit.runtime import pick_device

    started = time.perf_counter() if started is None else started
    main = ranks is None or ranks.is_main
    if ranks is None:
        staging = staging_for(target)
    else:
        staging = Path(ranks.from_main(str(staging_for(target)) if main else ""))
        if not staging.is_dir():
            raise UsageError(
                f"{target}: rank {ranks.rank} cannot see rank 0's staging directory "
                f"{staging}; under torchrun --out must be on a filesystem every rank shares"
            )
    try:
        source_info = SourceInfo(
            uri=resolved.uri, path=str(resolved.path), revision=resolved.revision,
            files=checkpoint.fingerprint(digest), selection=checkpoint.selection_note,
        )  # fmt: skip
        detection, plan = plan_checkpoint(checkpoint, family)
        writer = BaselineWriter(staging, fit, [layer.name for layer in plan.layers])
        report = fit_report(
            checkpoint, source_info, detection, plan, fit, pick_device(fit.device),
            progress=progress, sink=writer.sink, started=started, ranks=ranks,
        )  # fmt: skip
        if ranks is not None:
            writer.absorb(ranks.gather(writer.records))
        shapes = matrix_shapes(checkpoint, plan)
        made = Baseline(
            protocol_version=PROTOCOL_VERSION,
            tool={"name": "dynaudit", "version": __version__},
            created_at=report.created_at,
            source=source_info,
            family=report.family,
            settings=fit.numeric(),
            seeds=fit.seeds,
            layers=[
                _baseline_layer(layer, shapes[layer.name], writer) for layer in report.measured
            ],
            report=report,
        )
        if main:
            writer.finish(made, target)
    except BaseException:
        if main:
            discard(staging)
        raise
    return made


def _file_digest(options: SourceOptions) -> Callable[[Path], str]:
    """sha256 of a file, remembered in the cache's hash memo (an unchanged multi-GB checkpoint
    is hashed once across measure, baseline and check)."""
    from dynaudit.cache import ResultCache, cache_root

    return ResultCache(cache_root(options.cache_dir)).digest


def _baseline_layer(layer: LayerResult, shape: list[int], writer: BaselineWriter) -> BaselineLayer:
    return BaselineLayer(
        name=layer.name, type=layer.type, depth=layer.depth, group=layer.group, shape=shape,
        scale=layer.scale, coords=writer.files.get(layer.name),
        cold_mean_distance=writer.cold.get(layer.name, []),
        null_mean_distance=writer.null.get(layer.name, []), reason=layer.reason,
        digest=layer.digest,
    )  # fmt: skip


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
    **settings: Any,
) -> CheckReport:
    """Compare ``source`` with a baseline (a baseline directory, or any checkpoint SOURCE,
    measured on the fly) and decide the gate. Without ``baseline_ref`` the baseline is found
    as SPEC §2 says (:func:`find_baseline`). ``settings`` may only repeat the baseline's
    (``device`` and ``threads`` are free); ``baseline_from`` says where ``baseline_ref`` came
    from, for the report; ``read_pyproject=False`` (a ``--config`` file in use) keeps
    ./pyproject.toml out of the search. A baseline measured on the fly is kept in the cache
    for the next check (``cache=False``: measured into a temporary directory and dropped).

    Layers whose bytes equal the baseline's are not refitted; of the others, seed 0 is
    refitted first and the other K − 1 seeds only where a verdict under ``policy`` is near a
    threshold (docs/gate.md); ``all_seeds`` refits every seed of every changed layer."""
    import torch

    from dynaudit.runtime import pick_device, torch_scope

    options = sources or SourceOptions()
    chosen = policy or Policy()  # before the comparison: sequential seeds depend on it
    started = time.perf_counter()
    resolved = resolve(source, options)
    digest = _file_digest(options)
    # The candidate is opened (every file identified, the weights chosen) before a baseline
    # is found or measured: a bad candidate fails at once.
    with open_checkpoint(resolved, base, options, digest) as checkpoint:
        require_audited(checkpoint, resolved.uri)
        fingerprint = checkpoint.fingerprint(digest)
        if baseline_ref is None:
            ref, found_from = find_baseline(
                resolved.path, base, os.fspath(source), options, read_pyproject=read_pyproject
            )
        else:
            ref, found_from = os.fspath(baseline_ref), baseline_from
        log.info("baseline %s (%s)", ref, found_from)
        with _baseline_at(ref, options, settings, cache) as (stored, root, kept):
            # Device and threads are where the refits run, not what they compute.
            runtime = {
                "device": settings.get("device", "auto"), "threads": settings.get("threads")
            }  # fmt: skip
            numeric = {k: v for k, v in settings.items() if k not in runtime}
            check_settings(stored, numeric, str(ref))
            fit = stored.fit_settings().model_copy(update=runtime)
            device = pick_device(fit.device)
            detection = detect_family(checkpoint, family or stored.family.name)
            if family is None:  # not the user's choice: the baseline's family, named so
                detection = Detection(detection.family, 1.0, "the baseline's family")
            try:
                plan = detection.family.plan(checkpoint)
            except DynauditError as exc:
                if family is not None:  # the user's own --family: their error stands
                    raise
                raise BaselineError(
                    f"{resolved.uri}: architecture differs from the baseline ({stored.source.uri},"
                    f" family {stored.family.name}): {exc.message}; check it against a baseline "
                    "of its own base model"
                ) from exc
            require_layers(plan, detection, resolved.uri)
            check_architecture(stored, checkpoint, plan, resolved.uri)
            ranks = current()  # a torchrun job: each rank refits its share of the layers
            with torch_scope(device, fit.threads):
                threads = torch.get_num_threads()
                comparison = compare_plan(
                    checkpoint, plan, detection.family, stored, root, device, progress, ranks,
                    policy=chosen, all_seeds=all_seeds,
                )  # fmt: skip
    return CheckReport(
        tool={"name": "dynaudit", "version": __version__},
        source=SourceInfo(
            uri=resolved.uri, path=str(resolved.path), revision=resolved.revision,
            files=fingerprint, selection=checkpoint.selection_note,
        ),
        baseline=BaselineInfo(
            ref=str(ref), resolved_from=found_from, source=stored.source,
            created_at=stored.created_at, seeds=stored.seeds, stored=kept,
        ),
        family=family_info(detection, plan),
        settings={**fit.numeric(), "device": device.type, "threads": threads},
        policy=chosen,
        comparison=comparison,
        verdict=decide(comparison, chosen),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(),
        seconds=round(time.perf_counter() - started, 3),
    )  # fmt: skip


def require_audited(checkpoint: Checkpoint, uri: str) -> None:
    """Refuse a candidate holding weight files that transformers' ``from_pretrained`` would
    load and the audit would not read: a gate must not pass weights it never saw."""
    unread = checkpoint.unread_weights()
    if unread:
        shown = ", ".join(unread[:5]) + (f" and {len(unread) - 5} more" if len(unread) > 5 else "")
        raise UnauditedWeights(
            f"{uri}: transformers would load weight files the audit did not read ({shown}); "
            "audit the directory itself, or remove the files that are not the model",
            path=str(checkpoint.root),
        )


def compare(a: str | os.PathLike[str], b: str | os.PathLike[str], **kwargs: Any) -> CheckReport:
    """``check(b, baseline=a)``: two checkpoints, A measured on the fly as the baseline."""
    return check(b, a, **kwargs)


@contextlib.contextmanager
def _baseline_at(
    ref: str, options: SourceOptions, settings: dict[str, Any], cache: bool
) -> Iterator[tuple[Baseline, Path, bool]]:
    """A stored baseline directory, or one made from a checkpoint on the fly (kept in the
    cache unless ``cache`` is False)."""
    path = Path(ref).expanduser()
    if is_baseline(path):
        yield load_baseline(path), path, True
        return
    if ref.startswith("runs:/"):
        from dynaudit.tracking import fetch_baseline

        with tempfile.TemporaryDirectory(prefix="dynaudit-baseline-") as tmp:
            fetched = fetch_baseline(ref, Path(tmp), options.mlflow_uri)
            if is_baseline(fetched):
                yield load_baseline(fetched), fetched, True
                return
        # not a stored baseline: a checkpoint logged in a run, measured on the fly below
    require_single_process("check against a checkpoint (its baseline is measured first)")
    settings = {k: v for k, v in settings.items() if v is not None}
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
    ref: str, options: SourceOptions, settings: dict[str, Any]
) -> tuple[Baseline, Path] | None:
    """The baseline of checkpoint ``ref`` in the cache (``<cache>/baselines/<key>``), made
    there first if needed: a CI job checking against the same base measures it once. The key
    is the result cache's (file sha256s, settings, config, plugins, versions). None when the
    cache cannot be written (the caller measures into a temporary directory)."""
    from dynaudit.api import cache_context
    from dynaudit.cache import cache_root, discard_dir, result_key

    fit = settings_from(_baseline_settings(settings))
    resolved = resolve(ref, options)
    digest = _file_digest(options)
    with open_checkpoint(resolved, None, options, digest) as checkpoint:
        key = result_key(
            checkpoint.fingerprint(digest), fit.numeric(), family=None, scales=None,
            version=__version__, protocol=PROTOCOL_VERSION,
            context={**cache_context(checkpoint), "kind": "baseline"},
        )  # fmt: skip
        entry = cache_root(options.cache_dir) / "baselines" / key[:2] / key
        if is_baseline(entry):
            try:
                log.info("reusing the cached baseline of %s at %s", ref, entry)
                return load_baseline(entry), entry
            except BaselineError as exc:
                log.warning("remaking a damaged cached baseline: %s", exc)
                discard_dir(entry)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("could not write the baseline cache at %s: %s", entry.parent, exc)
            return None
        if not os.access(entry.parent, os.W_OK):
            log.warning("the baseline cache at %s is not writable", entry.parent)
            return None
        log.info("measuring the baseline of %s into the cache at %s", ref, entry)
        try:
            made = _write_baseline(checkpoint, resolved, entry, fit, family=None, digest=digest)
        except UsageError:
            if not is_baseline(entry):  # not a lost race with another process: a real error
                raise
            return load_baseline(entry), entry
    return made, entry


def cache_context(checkpoint: Checkpoint) -> dict[str, Any]:
    """Besides the weight files, what a report depends on: the config the family plugins read,
    how an adapter is merged, and which plugins are installed (they decide the family)."""
    from dynaudit.families import available_families
    from dynaudit.sources.adapters import AdapterCheckpoint

    merge = checkpoint.merge_plan() if isinstance(checkpoint, AdapterCheckpoint) else None
    return {"config": checkpoint.config, "merge": merge, "plugins": available_families()}
