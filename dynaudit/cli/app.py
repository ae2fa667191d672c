"""The Typer app. Commands parse flags, call :mod:`dynaudit.api`, render; nothing else."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from dynaudit.cli._errors import EXIT_CODES

if TYPE_CHECKING:
    from dynaudit.outputs import Inputs
    from dynaudit.schema import CheckReport, Report
    from dynaudit.sources import SourceOptions

_EPILOG = "Exit codes: " + "; ".join(
    f"{code} {text.split(':')[0]}" for code, text in EXIT_CODES.items()
)

app = typer.Typer(
    name="dynaudit",
    help="Audit neural-network checkpoints without data: the dynamical discrepancy of every "
    "layer.\n\n" + "\n\n".join(f"exit {code}: {text}" for code, text in EXIT_CODES.items()),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _setting(flag: str, metavar: str, help: str) -> Any:
    """An option that the environment (``DYNAUDIT_`` and the flag's name: ``--q-dim`` →
    ``DYNAUDIT_Q_DIM``) and the settings file can set too (:mod:`dynaudit.cli.settings`)."""
    variable = "DYNAUDIT_" + flag.removeprefix("--").replace("-", "_").upper()
    return typer.Option(flag, metavar=metavar, envvar=variable, help=help)


Source = Annotated[
    str,
    typer.Argument(
        metavar="SOURCE",
        help="checkpoint: a .safetensors file or directory, hf://org/name[@rev][/path] or org/name "
        "(Hugging Face Hub), models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest, "
        "models:/m-ID or runs:/RUN_ID/PATH (MLflow)",
    ),
]
Family = Annotated[
    str | None,
    _setting("--family", "NAME", "family plugin to use (default: detected)"),
]
Base = Annotated[
    str | None,
    typer.Option(
        "--base",
        metavar="SOURCE",
        help="base checkpoint of a LoRA adapter (default: from its config)",
    ),
]
Device = Annotated[
    str,
    _setting(
        "--device", "auto|cpu|cuda", "where fits run: auto (cuda when available), cpu or cuda"
    ),
]
QDim = Annotated[
    int | None,
    _setting("--q-dim", "N", "coordinate dimension q_dim"),
]
Pieces = Annotated[
    int | None,
    _setting("--pieces", "H", "pieces H (even, divides q_dim)"),
]
Steps = Annotated[
    int | None,
    _setting("--steps", "N", "Adam steps per fit"),
]
Seed = Annotated[
    int | None,
    _setting("--seed", "N", "seed of the first cold fit"),
]
MaxEntries = Annotated[
    int | None,
    _setting(
        "--max-entries",
        "N",
        "fit larger matrices on a seeded block of about this many entries (0: whole; "
        "default 1048576)",
    ),
]
Seeds = Annotated[
    int | None,
    _setting("--seeds", "K", "cold fits per layer; >1 reports the spread"),
]
Threads = Annotated[
    int | None,
    _setting("--threads", "N", "torch threads (default: torch's)"),
]
HfEndpoint = Annotated[
    str | None,
    typer.Option(
        "--hf-endpoint",
        metavar="URL",
        envvar="HF_ENDPOINT",
        help="Hugging Face Hub URL (default: the Hub)",
    ),
]
HfToken = Annotated[
    str | None,
    typer.Option(
        "--hf-token",
        metavar="TOKEN",
        help="Hub token (default: HF_TOKEN; prefer the variable: flags show in process lists)",
        show_default=False,
    ),
]
MlflowUri = Annotated[
    str | None,
    typer.Option(
        "--mlflow-uri",
        metavar="URI",
        envvar="MLFLOW_TRACKING_URI",
        help="MLflow tracking server (also the registry, unless MLFLOW_REGISTRY_URI is set)",
    ),
]
CacheDir = Annotated[
    Path | None,
    _setting(
        "--cache-dir",
        "DIR",
        "result and download cache (default: $HF_HOME/assets/dynaudit when HF_HOME is set, "
        "else ~/.cache/dynaudit)",
    ),
]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="read pickle weights (.bin/.pt) with torch.load(weights_only=True), which builds "
        "tensors only and runs no code from the file; refused otherwise",
    ),
]
PolicyPath = Annotated[
    Path | None,
    _setting(
        "--policy",
        "FILE",
        "TOML gate policy (default: [tool.dynaudit.policy] of the settings file)",
    ),
]
JsonOut = Annotated[
    Path | None,
    typer.Option("--json", metavar="PATH", help="write the JSON report here (-: stdout)"),
]
MarkdownOut = Annotated[
    Path | None,
    typer.Option("--markdown", metavar="PATH", help="write the Markdown report here (-: stdout)"),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no table on stdout")]
JunitOut = Annotated[
    Path | None,
    typer.Option(
        "--junit", metavar="PATH", help="write JUnit XML here, a test case per group (-: stdout)"
    ),
]
LogMlflow = Annotated[
    bool,
    typer.Option(
        "--mlflow",
        help="log metrics, settings, tags and the reports to MLflow (--mlflow-uri or "
        "MLFLOW_TRACKING_URI; the active run, else a new run in MLFLOW_EXPERIMENT_NAME)",
    ),
]
MaxDropAll = Annotated[
    float | None,
    _setting("--max-drop-all", "PCT", "% drop of all layers that fails"),
]
MaxDropGroup = Annotated[
    float | None,
    _setting("--max-drop-group", "PCT", "% drop of a depth third that fails"),
]
MaxLayerChange = Annotated[
    float | None,
    _setting("--max-layer-change", "PCT", "% change of any layer, either direction, that fails"),
]
MaxDisplacement = Annotated[
    float | None,
    _setting(
        "--max-displacement",
        "X",
        "neuron displacement of any layer that fails (units of its mean distance)",
    ),
]
MaxWeightChange = Annotated[
    float | None,
    _setting(
        "--max-weight-change",
        "PCT",
        "% a layer's weights may move, ‖ΔW‖/‖W‖, before it counts as replaced",
    ),
]
MaxNoiseChange = Annotated[
    float | None,
    _setting(
        "--max-noise-change",
        "PCT",
        "% a layer's weights may move in a noise-like way before it is damage",
    ),
]
Revision = Annotated[
    str | None,
    typer.Option(
        "--revision", metavar="REV",
        help="Hub revision of SOURCE: a branch, tag, commit or refs/pr/N (the same as "
        "hf://org/name@REV)",
    ),
]  # fmt: skip
NoCache = Annotated[
    bool, typer.Option("--no-cache", help="always fit, never reuse or store a cached result")
]
AllSeeds = Annotated[
    bool,
    typer.Option(
        "--all-seeds",
        help="refit every baseline seed of every changed layer (default: seed 0 first, the "
        "others only where a verdict is near a threshold)",
    ),
]
NoBaselineCache = Annotated[
    bool,
    typer.Option(
        "--no-cache",
        help="measure a checkpoint baseline afresh and do not keep it (default: kept in the "
        "cache and reused)",
    ),
]


def _show_version(value: bool) -> None:
    if value:
        from dynaudit import __version__

        typer.echo(f"dynaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _settings(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        _setting(
            "--config",
            "FILE",
            "settings file: [tool.dynaudit] of a pyproject.toml, or the same keys at the top "
            "level of any TOML file (default: ./pyproject.toml); flags and DYNAUDIT_* "
            "variables win over it",
        ),
    ] = None,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            help="say more on stderr: -v what is read and reused, -vv also debug detail and "
            "tracebacks of internal errors",
        ),
    ] = 0,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Read the settings file into click's default map (so a flag or a DYNAUDIT_* variable
    wins over it) and set how much is logged."""
    from dynaudit.cli.settings import default_map, ignored_keys, read_table

    if verbose:
        logging.getLogger("dynaudit").setLevel(logging.INFO if verbose == 1 else logging.DEBUG)
    if verbose > 1:
        from dynaudit.cli import _errors

        _errors.show_tracebacks(True)
    ctx.meta["dynaudit.config"] = config  # replaces ./pyproject.toml, policy and baseline too
    path = config if config is not None else Path("pyproject.toml")
    if config is None and not path.is_file():
        return
    table = read_table(path, explicit=config is not None)
    where = f"[tool.dynaudit] of {path}" if config is None else f"--config {path}"
    commands = [(name, [p.name for p in cmd.params if p.name]) for name, cmd in _commands(ctx)]
    ctx.default_map = default_map(table, where, commands, relative_to=path.parent)
    ctx.meta["dynaudit.settings"] = where
    unused = ignored_keys(table, dict(commands).get(ctx.invoked_subcommand or "", []))
    if unused:
        logging.getLogger("dynaudit").info(
            "%s: %s not used by `dynaudit %s`", where, ", ".join(unused), ctx.invoked_subcommand
        )


def _commands(ctx: typer.Context) -> list[tuple[str, Any]]:
    """The group's subcommands (click's or Typer's own copy of click: duck-typed)."""
    found: dict[str, Any] = getattr(ctx.command, "commands", {})
    return list(found.items())


def _pinned(source: str, revision: str | None) -> str:
    """SOURCE with ``--revision`` folded into its URI, which every later step (and the
    report's ``source.uri``) reads; not a source option, so an adapter's base and
    ``--baseline`` never inherit it."""
    from dynaudit.sources import with_revision

    return with_revision(source, revision)  # None: SOURCE as given


def _sources(
    hf_endpoint: str | None,
    hf_token: str | None,
    mlflow_uri: str | None,
    cache_dir: Path | None,
    allow_pickle: bool,
) -> SourceOptions:
    from dynaudit.sources import SourceOptions

    return SourceOptions(
        hf_endpoint=hf_endpoint, hf_token=hf_token, mlflow_uri=mlflow_uri, cache_dir=cache_dir,
        allow_pickle=allow_pickle,
    )  # fmt: skip


def _console() -> Console:
    """stdout; logs and pipes get a wide table rather than rich's 80-column default."""
    return Console(width=None if sys.stdout.isatty() else 140)


@app.command(epilog=_EPILOG)
def measure(
    source: Source,
    revision: Revision = None,
    family: Family = None,
    base: Base = None,
    device: Device = "auto",
    q_dim: QDim = None,
    pieces: Pieces = None,
    steps: Steps = None,
    max_entries: MaxEntries = None,
    seed: Seed = None,
    seeds: Seeds = None,
    threads: Threads = None,
    hf_endpoint: HfEndpoint = None,
    hf_token: HfToken = None,
    mlflow_uri: MlflowUri = None,
    cache_dir: CacheDir = None,
    allow_pickle: AllowPickle = False,
    no_cache: NoCache = False,
    log_mlflow: LogMlflow = False,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", metavar="PATH", help="write the JSON report here (-: stdout)"),
    ] = None,
    markdown_path: Annotated[
        Path | None, typer.Option("--markdown", help="write the Markdown report here (-: stdout)")
    ] = None,
    quiet: Quiet = False,
) -> int:
    """Fit every layer and report its discrepancy, mean distance and fidelity."""
    from dynaudit.api import measure as run
    from dynaudit.distributed import is_main
    from dynaudit.errors import NonFiniteWeights
    from dynaudit.outputs import Inputs, guard_outputs, is_stdout
    from dynaudit.reports import render_markdown, render_terminal, write_json, write_text_atomic

    outputs = {"--json": json_path, "--markdown": markdown_path}
    source = _pinned(source, revision)
    inputs = Inputs()
    inputs.add_source(source, base)
    guard_outputs(outputs, inputs)  # before any fit
    main_rank = is_main()  # under torchrun every rank fits its share; rank 0 reports
    with _progress() if main_rank else contextlib.nullcontext() as progress:
        report = run(
            source, family=family, base=base, progress=progress, q_dim=q_dim, pieces=pieces,
            steps=steps, max_entries=max_entries, seed=seed, seeds=seeds, device=device,
            threads=threads,
            sources=_sources(hf_endpoint, hf_token, mlflow_uri, cache_dir, allow_pickle),
            cache=not no_cache,
        )  # fmt: skip
    if not main_rank:
        return 0
    inputs.add_checkpoint(Path(report.source.path), "the checkpoint", base, report.source.files)
    guard_outputs(outputs, inputs)  # the source resolved: its local copy is an input too
    if json_path is not None:
        write_json(report, json_path)
    if markdown_path is not None:
        write_text_atomic(markdown_path, render_markdown(report))
    if not quiet and not any(map(is_stdout, outputs.values())):  # `-`: stdout is the report's
        render_terminal(report, _console())
    if log_mlflow:
        _log_to_mlflow(report, mlflow_uri)
    if report.non_finite:
        raise NonFiniteWeights(report.non_finite)
    return 0


@app.command("baseline", epilog=_EPILOG)
def baseline_command(
    source: Source,
    revision: Revision = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", metavar="DIR", help="baseline directory to create (never overwritten)"
        ),
    ] = None,
    family: Family = None,
    base: Base = None,
    device: Device = "auto",
    q_dim: QDim = None,
    pieces: Pieces = None,
    steps: Steps = None,
    max_entries: MaxEntries = None,
    seed: Seed = None,
    seeds: Annotated[
        int | None,
        _setting("--seeds", "K", "K cold fits (and null refits) per layer (default 3)"),
    ] = None,
    threads: Threads = None,
    hf_endpoint: HfEndpoint = None,
    hf_token: HfToken = None,
    mlflow_uri: MlflowUri = None,
    cache_dir: CacheDir = None,
    allow_pickle: AllowPickle = False,
    log_mlflow: Annotated[
        bool,
        typer.Option(
            "--mlflow",
            help="store it as the artifacts of a new MLflow run (and tag the model version "
            "when SOURCE is one); prints the runs:/ URI to use as --baseline",
        ),
    ] = False,
    experiment: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="MLflow experiment (default: MLFLOW_EXPERIMENT_NAME)"),
    ] = None,
) -> int:
    """Store a baseline: K cold fits of every layer, their null refits, scales and settings."""
    from dynaudit.api import baseline as run
    from dynaudit.distributed import is_main
    from dynaudit.outputs import Inputs, guard_outputs

    source = _pinned(source, revision)
    inputs = Inputs()
    inputs.add_source(source, base)
    guard_outputs({"--out": out}, inputs, directory=True)  # before any fit
    main_rank = is_main()  # under torchrun every rank fits its share; rank 0 writes
    with _progress() if main_rank else contextlib.nullcontext() as progress:
        made = run(
            source, out, family=family, base=base, progress=progress, device=device,
            q_dim=q_dim, pieces=pieces, steps=steps, max_entries=max_entries, seed=seed,
            seeds=seeds, threads=threads,
            sources=_sources(hf_endpoint, hf_token, mlflow_uri, cache_dir, allow_pickle),
            mlflow=log_mlflow, experiment=experiment,
        )  # fmt: skip
    if not main_rank:
        return 0
    fitted = sum(1 for layer in made.layers if layer.coords)
    where = " and ".join(
        x for x in (str(out) if out else "", made.stored_at if log_mlflow else "") if x
    )
    from dynaudit.errors import printable

    typer.echo(printable(
        f"baseline of {made.source.uri} stored in {where}: {fitted} layers × {made.seeds} "
        f"seeds, family {made.family.name}, protocol v{made.protocol_version}"
    ))  # fmt: skip
    return 0


@app.command(epilog=_EPILOG)
def check(
    ctx: typer.Context,
    source: Source,
    revision: Revision = None,
    baseline_ref: Annotated[
        str | None,
        _setting(
            "--baseline",
            "REF",
            "baseline directory, or a checkpoint (any SOURCE form) measured as one; default: "
            "[tool.dynaudit] baseline, the adapter's base, the model card's base_model",
        ),
    ] = None,
    policy_path: PolicyPath = None,
    max_drop_all: MaxDropAll = None,
    max_drop_group: MaxDropGroup = None,
    max_layer_change: MaxLayerChange = None,
    max_displacement: MaxDisplacement = None,
    max_weight_change: MaxWeightChange = None,
    max_noise_change: MaxNoiseChange = None,
    family: Family = None,
    base: Base = None,
    device: Device = "auto",
    threads: Threads = None,
    hf_endpoint: HfEndpoint = None,
    hf_token: HfToken = None,
    mlflow_uri: MlflowUri = None,
    cache_dir: CacheDir = None,
    allow_pickle: AllowPickle = False,
    json_path: JsonOut = None,
    markdown_path: MarkdownOut = None,
    junit_path: JunitOut = None,
    log_mlflow: LogMlflow = False,
    no_cache: NoBaselineCache = False,
    all_seeds: AllSeeds = False,
    quiet: Quiet = False,
) -> int:
    """Compare a checkpoint with its baseline; exit 1 when capacity was lost or weights damaged."""
    from dynaudit.api import check as run
    from dynaudit.distributed import is_main
    from dynaudit.gate import load_policy
    from dynaudit.outputs import Inputs, guard_outputs

    source = _pinned(source, revision)
    inputs = Inputs()
    inputs.add_source(source, base)
    inputs.add_reference(baseline_ref)
    guard_outputs(_reports(json_path, markdown_path, junit_path), inputs)  # before any fit
    policy = load_policy(
        policy_path, settings=ctx.meta.get("dynaudit.config"), max_drop_all=max_drop_all,
        max_drop_group=max_drop_group,
        max_layer_change=max_layer_change, max_displacement=max_displacement,
        max_weight_change=max_weight_change, max_noise_change=max_noise_change,
    )  # fmt: skip
    main_rank = is_main()  # under torchrun every rank refits its share; rank 0 reports
    with _progress() if main_rank else contextlib.nullcontext() as progress:
        report = run(
            source, baseline_ref, policy=policy, family=family, base=base, progress=progress,
            device=device, threads=threads, cache=not no_cache, all_seeds=all_seeds,
            sources=_sources(hf_endpoint, hf_token, mlflow_uri, cache_dir, allow_pickle),
            baseline_from=_baseline_given_by(ctx),
            read_pyproject=ctx.meta.get("dynaudit.config") is None,
        )  # fmt: skip
    if not main_rank:
        return 0
    return _finish_check(
        report, inputs, base, json_path, markdown_path, junit_path, quiet, log_mlflow, mlflow_uri
    )


@app.command(epilog=_EPILOG)
def compare(
    ctx: typer.Context,
    a: Annotated[
        str, typer.Argument(metavar="A", help="the reference checkpoint (measured as the baseline)")
    ],
    b: Annotated[str, typer.Argument(metavar="B", help="the checkpoint to compare with it")],
    policy_path: PolicyPath = None,
    max_drop_all: MaxDropAll = None,
    max_drop_group: MaxDropGroup = None,
    max_layer_change: MaxLayerChange = None,
    max_displacement: MaxDisplacement = None,
    max_weight_change: MaxWeightChange = None,
    max_noise_change: MaxNoiseChange = None,
    family: Family = None,
    device: Device = "auto",
    q_dim: QDim = None,
    pieces: Pieces = None,
    steps: Steps = None,
    max_entries: MaxEntries = None,
    seeds: Seeds = None,
    hf_endpoint: HfEndpoint = None,
    hf_token: HfToken = None,
    mlflow_uri: MlflowUri = None,
    cache_dir: CacheDir = None,
    allow_pickle: AllowPickle = False,
    json_path: JsonOut = None,
    markdown_path: MarkdownOut = None,
    junit_path: JunitOut = None,
    log_mlflow: LogMlflow = False,
    no_cache: NoBaselineCache = False,
    all_seeds: AllSeeds = False,
    quiet: Quiet = False,
) -> int:
    """Compare two checkpoints: A is measured as the baseline of B (and kept in the cache)."""
    from dynaudit.api import compare as run
    from dynaudit.gate import load_policy
    from dynaudit.outputs import Inputs, guard_outputs

    inputs = Inputs()
    inputs.add_source(a)
    inputs.add_source(b)
    guard_outputs(_reports(json_path, markdown_path, junit_path), inputs)  # before any fit
    policy = load_policy(
        policy_path, settings=ctx.meta.get("dynaudit.config"), max_drop_all=max_drop_all,
        max_drop_group=max_drop_group,
        max_layer_change=max_layer_change, max_displacement=max_displacement,
        max_weight_change=max_weight_change, max_noise_change=max_noise_change,
    )  # fmt: skip
    with _progress() as progress:
        report = run(
            a, b, policy=policy, family=family, progress=progress, device=device,
            q_dim=q_dim, pieces=pieces, steps=steps, max_entries=max_entries, seeds=seeds,
            cache=not no_cache, all_seeds=all_seeds,
            sources=_sources(hf_endpoint, hf_token, mlflow_uri, cache_dir, allow_pickle),
        )  # fmt: skip
    return _finish_check(
        report, inputs, None, json_path, markdown_path, junit_path, quiet, log_mlflow, mlflow_uri
    )


def _baseline_given_by(ctx: typer.Context) -> str:
    """Where ``--baseline``'s value came from, for the report: the flag, the environment
    variable, or the settings file."""
    source = getattr(ctx.get_parameter_source("baseline_ref"), "name", "")
    if source == "ENVIRONMENT":
        return "DYNAUDIT_BASELINE"
    if source == "DEFAULT_MAP":
        return f"baseline in {ctx.meta.get('dynaudit.settings', 'the settings file')}"
    return "--baseline"


def _reports(
    json_path: Path | None, markdown_path: Path | None, junit_path: Path | None
) -> dict[str, Path | None]:
    return {"--json": json_path, "--markdown": markdown_path, "--junit": junit_path}


def _finish_check(
    report: CheckReport,
    inputs: Inputs,
    base: str | None,
    json_path: Path | None,
    markdown_path: Path | None,
    junit_path: Path | None,
    quiet: bool,
    log_mlflow: bool,
    mlflow_uri: str | None,
) -> int:
    """Write the requested files, print the table, report to GitHub Actions when inside it,
    then log to MLflow when asked; the exit code is the verdict's. The resolved checkpoint and
    baseline are inputs too: no output may be one of them."""
    from dynaudit.errors import NonFiniteWeights
    from dynaudit.outputs import guard_outputs, is_stdout
    from dynaudit.reports import write_text_atomic
    from dynaudit.reports.check import render_check_markdown, render_check_terminal
    from dynaudit.reports.ci import render_junit, report_to_github

    outputs = _reports(json_path, markdown_path, junit_path)
    inputs.add_checkpoint(Path(report.source.path), "the checkpoint", base, report.source.files)
    inputs.add_reference(report.baseline.ref)
    guard_outputs(outputs, inputs)
    to_stdout = any(map(is_stdout, outputs.values()))  # `-`: stdout is the report's
    if json_path is not None:
        write_text_atomic(json_path, report.model_dump_json(indent=2) + "\n")
    if markdown_path is not None:
        write_text_atomic(markdown_path, render_check_markdown(report))
    if junit_path is not None:
        write_text_atomic(junit_path, render_junit(report))
    if not quiet and not to_stdout:
        render_check_terminal(report, _console())
    for line in report_to_github(report):
        typer.echo(line, err=to_stdout)
    if log_mlflow:
        _log_to_mlflow(report, mlflow_uri)
    if report.comparison.non_finite:
        raise NonFiniteWeights(report.comparison.non_finite)
    return 0 if report.verdict.passed else 1


def _log_to_mlflow(report: Report | CheckReport, mlflow_uri: str | None) -> None:
    """MLflow is a side channel (SPEC §8): it is logged after every report file is written,
    and a failure (server down, access refused) is one warning line while the verdict's exit
    code stands."""
    from dynaudit.errors import DynauditError
    from dynaudit.tracking import log_report

    try:
        log_report(report, tracking_uri=mlflow_uri)
    except Exception as exc:  # whatever broke, the reports are written and the verdict stands
        reason = exc.message if isinstance(exc, DynauditError) else f"{type(exc).__name__}: {exc}"
        logging.getLogger("dynaudit").warning(
            "could not log to MLflow (%s); the verdict stands", reason
        )


@app.command(epilog=_EPILOG)
def inspect(
    source: Source,
    revision: Revision = None,
    family: Family = None,
    base: Base = None,
    weights: Annotated[
        bool,
        typer.Option(
            "--weights", help="also read the weights: ranks, degenerate layers, branch gains"
        ),
    ] = False,
    q_dim: QDim = None,
    pieces: Pieces = None,
    steps: Steps = None,
    max_entries: MaxEntries = None,
    seeds: Seeds = None,
    hf_endpoint: HfEndpoint = None,
    hf_token: HfToken = None,
    mlflow_uri: MlflowUri = None,
    cache_dir: CacheDir = None,
    allow_pickle: AllowPickle = False,
    json_path: JsonOut = None,
    quiet: Quiet = False,
) -> int:
    """Headers only (no weights read): family, layer graph, shapes, dtypes, size, structural
    class and fit cost. --weights adds ranks, degenerate layers and residual-branch gains."""
    from dynaudit.api import inspect as run
    from dynaudit.outputs import Inputs, guard_outputs, is_stdout
    from dynaudit.reports import write_text_atomic
    from dynaudit.reports.inspect import render_inspection

    source = _pinned(source, revision)
    read = Inputs()
    read.add_source(source, base)
    guard_outputs({"--json": json_path}, read)
    found = run(
        source, family=family, base=base, weights=weights, q_dim=q_dim, pieces=pieces,
        steps=steps, max_entries=max_entries, seeds=seeds,
        sources=_sources(hf_endpoint, hf_token, mlflow_uri, cache_dir, allow_pickle),
    )  # fmt: skip
    if json_path is not None:
        write_text_atomic(json_path, found.model_dump_json(indent=2) + "\n")
    if not quiet and not is_stdout(json_path):
        render_inspection(found, _console())
    return 0


@app.command(epilog=_EPILOG)
def plot(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="INPUT",
            help="a check report (JSON) → per-layer bars; several measure reports (JSON) → "
            "trajectory; a baseline directory → neuron map",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", metavar="PATH", help="PNG file to write (-: standard output)")
    ] = Path("dynaudit.png"),
    layer: Annotated[
        str | None, typer.Option(help="neuron map: the layer (default: the first)")
    ] = None,
    method: Annotated[
        str, typer.Option(help="neuron map: pca, or tsne (scikit-learn); no other")
    ] = "pca",
) -> int:
    """PNG plots: base vs checked per layer, a trajectory over reports, a neuron map."""
    import json

    from dynaudit.baseline_store import is_baseline
    from dynaudit.errors import InputError, UsageError
    from dynaudit.outputs import Inputs, guard_outputs, is_stdout
    from dynaudit.plots import check_method, plot_bars, plot_neurons, plot_trajectory
    from dynaudit.schema import CheckReport, Report, read_report

    check_method(method)
    read = Inputs()
    for path in inputs:
        if path.is_dir():
            read.add_tree(path, "the plot input")
        else:
            read.add_file(path, "the plot input")
    guard_outputs({"--out": out}, read)
    if len(inputs) == 1 and is_baseline(inputs[0]):
        written = plot_neurons(inputs[0], layer, out, method)
    else:
        loaded: list[Report | CheckReport] = []
        for path in inputs:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError) as exc:
                raise InputError(f"{path}: not a dynaudit report or baseline ({exc})") from exc
            loaded.append(read_report(data, str(path)))  # a newer minor: unknown fields dropped
        checks = [r for r in loaded if isinstance(r, CheckReport)]
        if len(loaded) == 1 and checks:
            written = plot_bars(checks[0], out)
        elif checks:
            raise UsageError("a trajectory is drawn from measure reports, not check reports")
        else:
            measured = [r for r in loaded if isinstance(r, Report)]
            written = plot_trajectory(measured, [p.stem for p in inputs], out)
    typer.echo(f"wrote {written}", err=is_stdout(out))
    return 0


@app.command()
def plugins() -> int:
    """Installed family plugins and where they come from."""
    from dynaudit.errors import DynauditError
    from dynaudit.families import available_families, get_family
    from dynaudit.reports.escape import plain

    console = _console()
    console.print("family plugins (entry-point group dynaudit.plugins):")
    for name, origin in available_families().items():
        try:
            about, style = get_family(name).description, ""
        except DynauditError as exc:
            about, style = f"failed to load: {exc.message}", "red"
        console.print(plain(name, style="bold"), plain(f"  {origin}"), soft_wrap=True)
        console.print(plain(f"    {about}", style=style), soft_wrap=True)
    return 0


@app.command()
def demo(
    out: Annotated[
        Path | None,
        typer.Option(
            help="a new or empty directory to build the demo checkpoint in (default: temporary)"
        ),
    ] = None,
) -> int:
    """Build a tiny trained checkpoint locally (no network) and audit it."""
    import tempfile

    from dynaudit.demo import build_demo_checkpoint, refuse_foreign
    from dynaudit.outputs import Inputs, guard_outputs

    if out is not None:
        guard_outputs({"--out": out}, Inputs(), directory=True)  # `-`, a parent that is a file
        refuse_foreign(out)  # never over a checkpoint or anything else the user had
    with tempfile.TemporaryDirectory(prefix="dynaudit-demo-") as tmp:
        target = out or Path(tmp) / "demo-mlp"
        typer.echo(f"building a tiny trained checkpoint in {target} ...", err=True)
        accuracy = build_demo_checkpoint(target)
        typer.echo(f"trained: held-out accuracy {accuracy:.1%}; auditing it:", err=True)
        return measure(str(target), family=None, base=None, device="auto", q_dim=None, pieces=None,
                       steps=None, seed=None, seeds=2, threads=None, hf_endpoint=None,
                       hf_token=None, mlflow_uri=None, cache_dir=None, allow_pickle=False,
                       no_cache=True, log_mlflow=False,
                       json_path=None, markdown_path=None, quiet=False)  # fmt: skip


@contextlib.contextmanager
def _progress() -> Iterator[Callable[[int, int, str], None] | None]:
    """A rich progress bar over layers on an interactive terminal; silent in CI and pipes."""
    from dynaudit.terminal import interactive

    if not interactive():
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from dynaudit.errors import printable

    bar = Progress(
        TextColumn("fitting"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(), TextColumn("{task.fields[layer]}", markup=False),
        console=Console(stderr=True), transient=True,
    )  # fmt: skip
    task = bar.add_task("fit", total=None, layer="")

    def update(done: int, total: int, layer: str) -> None:
        bar.update(task, completed=done, total=total, layer=printable(layer))

    with bar:
        yield update
