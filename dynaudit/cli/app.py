"""The Typer app. Each command checks its flags, calls one :mod:`dynaudit.api` function and
hands the result to its renderers, written through
:func:`~dynaudit.reports.render.render_report`. The flags are declared once, in
:mod:`dynaudit.cli.options`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from dynaudit.cli import options as flags
from dynaudit.errors import ExitCode
from dynaudit.outputs import Inputs, guard_outputs, is_stdout

if TYPE_CHECKING:
    from dynaudit.reports.render import Reporter
    from dynaudit.schema import CheckReport, Report

_EPILOG = "Exit codes: " + "; ".join(f"{code} {code.meaning.split(':')[0]}" for code in ExitCode)

app = typer.Typer(
    name="dynaudit",
    help="Audit neural-network checkpoints without data: the dynamical discrepancy of every "
    "layer.\n\n" + "\n\n".join(f"exit {code}: {code.meaning}" for code in ExitCode),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _settings(
    ctx: typer.Context,
    config: flags.Config = None,
    verbose: flags.Verbose = 0,
    version: flags.Version = False,
) -> None:
    """Read the settings file into click's default map (so a flag or a DYNAUDIT_* variable
    wins over it); ``--verbose`` and ``--version`` act as they are parsed."""
    from dynaudit.cli.settings import apply_settings

    apply_settings(ctx, config)


@app.command(epilog=_EPILOG)
@flags.grouped
def measure(
    source: flags.Source,
    revision: flags.Revision = None,
    family: flags.Family = None,
    base: flags.Base = None,
    layers: flags.Layers = None,
    experts: flags.Experts = None,
    *,
    fitting: flags.Fitting,
    reach: flags.Reach,
    no_cache: flags.NoCache = False,
    log_mlflow: flags.LogMlflow = False,
    json_path: flags.JsonOut = None,
    markdown_path: flags.MarkdownOut = None,
    quiet: flags.Quiet = False,
) -> int:
    """Fit every layer and report its discrepancy, mean distance and fidelity."""
    from dynaudit.api import measure as run
    from dynaudit.errors import NonFiniteWeights
    from dynaudit.reports import render_markdown, render_terminal
    from dynaudit.reports.render import JSON, Terminal, Text, publish

    files: dict[str, tuple[Path | None, Reporter[Report]]] = {
        "--json": (json_path, JSON),
        "--markdown": (markdown_path, Text(render_markdown)),
    }
    source, inputs = _read(source, revision, base)
    guard_outputs(flags.paths(files), inputs)  # before any fit
    with _fitting() as (main_rank, progress):
        report = run(
            source,
            family=family,
            base=base,
            progress=progress,
            sources=reach.options(),
            cache=not no_cache,
            layers=layers,
            experts=experts,
            **fitting.settings(),
        )
    if not main_rank:
        return ExitCode.OK
    inputs.add_checkpoint(Path(report.source.path), "the checkpoint", base, report.source.files)
    publish(report, files, inputs, None if quiet else Terminal(render_terminal))
    if log_mlflow:
        from dynaudit.tracking import log_or_warn

        log_or_warn(report, reach.mlflow_uri)
    if report.non_finite:
        raise NonFiniteWeights(report.non_finite)
    return ExitCode.OK


@app.command("baseline", epilog=_EPILOG)
@flags.grouped
def baseline_command(
    source: flags.Source,
    revision: flags.Revision = None,
    out: flags.BaselineOut = None,
    family: flags.Family = None,
    base: flags.Base = None,
    *,
    fitting: flags.BaselineFitting,
    reach: flags.Reach,
    log_mlflow: flags.StoreMlflow = False,
    experiment: flags.Experiment = None,
) -> int:
    """Store a baseline: K cold fits of every layer, their null refits, scales and settings."""
    from dynaudit.api import baseline as run
    from dynaudit.reports.render import show
    from dynaudit.reports.terminal import StoredBaseline

    source, inputs = _read(source, revision, base)
    guard_outputs({"--out": out}, inputs, directory=True)  # before any fit
    with _fitting() as (main_rank, progress):
        made = run(
            source,
            out,
            family=family,
            base=base,
            progress=progress,
            sources=reach.options(),
            mlflow=log_mlflow,
            experiment=experiment,
            **fitting.settings(),
        )
    if main_rank:
        where = [str(out) if out else "", made.stored_at if log_mlflow else ""]
        show(StoredBaseline(" and ".join(x for x in where if x)), made)
    return ExitCode.OK


@app.command(epilog=_EPILOG)
@flags.grouped
def check(
    ctx: typer.Context,
    source: flags.Source,
    revision: flags.Revision = None,
    baseline_ref: flags.BaselineRef = None,
    *,
    thresholds: flags.Thresholds,
    family: flags.Family = None,
    base: flags.Base = None,
    device: flags.Device = "auto",
    threads: flags.Threads = None,
    reach: flags.Reach,
    outputs: flags.CheckRun,
    hub: flags.HubWriteBack,
) -> int:
    """Compare a checkpoint with its baseline; exit 1 when capacity was lost or weights damaged."""
    from dynaudit.api import check as run

    source, inputs = _read(source, revision, base)
    hub.check(source)
    inputs.add_reference(baseline_ref)
    guard_outputs(flags.paths(outputs.files()), inputs)  # before any fit
    config = ctx.meta.get("dynaudit.config")
    policy = thresholds.policy(config)
    with _fitting() as (main_rank, progress):
        report = run(
            source,
            baseline_ref,
            policy=policy,
            family=family,
            base=base,
            progress=progress,
            device=device,
            threads=threads,
            cache=not outputs.no_cache,
            all_seeds=outputs.all_seeds,
            sources=reach.options(),
            baseline_from=flags.origin(ctx, "baseline_ref", "--baseline"),
            read_pyproject=config is None,
        )
    if not main_rank:
        return ExitCode.OK
    return _finish_check(report, inputs, base, outputs, reach, hub)


@app.command(epilog=_EPILOG)
@flags.grouped
def compare(
    ctx: typer.Context,
    a: flags.Reference,
    b: flags.Compared,
    *,
    thresholds: flags.Thresholds,
    family: flags.Family = None,
    device: flags.Device = "auto",
    fit: flags.Fit,
    reach: flags.Reach,
    outputs: flags.CheckRun,
) -> int:
    """Compare two checkpoints: A is measured as the baseline of B (and kept in the cache)."""
    from dynaudit.api import compare as run
    from dynaudit.reports.progress import progress_bar

    inputs = Inputs()
    inputs.add_source(a)
    inputs.add_source(b)
    guard_outputs(flags.paths(outputs.files()), inputs)  # before any fit
    policy = thresholds.policy(ctx.meta.get("dynaudit.config"))
    with progress_bar() as progress:
        report = run(
            a,
            b,
            policy=policy,
            family=family,
            progress=progress,
            **fit.settings(device=device),
            cache=not outputs.no_cache,
            all_seeds=outputs.all_seeds,
            sources=reach.options(),
        )
    return _finish_check(report, inputs, None, outputs, reach)


def _finish_check(
    report: CheckReport,
    inputs: Inputs,
    base: str | None,
    outputs: flags.CheckRun,
    reach: flags.Reach,
    hub: flags.HubWriteBack | None = None,
) -> int:
    """Write the requested files, print the table, report to GitHub Actions when inside it,
    then log to MLflow and post to the Hub when asked (side channels: a failure is a warning);
    the exit code is the verdict's. The resolved checkpoint and baseline are inputs too: no
    output may be one of them."""
    from dynaudit.errors import NonFiniteWeights
    from dynaudit.reports.check import render_check_terminal
    from dynaudit.reports.ci import report_to_github
    from dynaudit.reports.render import Terminal, publish

    inputs.add_checkpoint(Path(report.source.path), "the checkpoint", base, report.source.files)
    inputs.add_reference(report.baseline.ref)
    table = None if outputs.quiet else Terminal(render_check_terminal)
    to_stdout = publish(report, outputs.files(), inputs, table)
    for line in report_to_github(report):
        typer.echo(line, err=to_stdout)
    if outputs.log_mlflow:
        from dynaudit.tracking import log_or_warn

        log_or_warn(report, reach.mlflow_uri)
    if hub is not None and (hub.hub_comment or hub.hub_pr):
        from dynaudit.hub_comments import post_or_warn

        post_or_warn(report, reach.options(), comment=hub.hub_comment, pr=hub.hub_pr)
    if report.comparison.non_finite:
        raise NonFiniteWeights(report.comparison.non_finite)
    return ExitCode.OK if report.verdict.passed else ExitCode.GATE_FAILED


@app.command(epilog=_EPILOG)
@flags.grouped
def serve(
    ctx: typer.Context,
    *,
    serving: flags.Serving,
    device: flags.Device = "auto",
    threads: flags.Threads = None,
) -> int:
    """Receive MLflow registry and Hugging Face Hub webhooks, check each new model version or
    push against its declared baseline, and write the verdict back (docs/registry.md)."""
    from dynaudit.serve import run

    return run(serving.settings(ctx.meta.get("dynaudit.config"), device, threads))


@app.command(epilog=_EPILOG)
@flags.grouped
def inspect(
    source: flags.Source,
    revision: flags.Revision = None,
    family: flags.Family = None,
    base: flags.Base = None,
    weights: flags.Weights = False,
    *,
    fit: flags.Fit,
    reach: flags.Reach,
    json_path: flags.JsonOut = None,
    quiet: flags.Quiet = False,
) -> int:
    """Headers only (no weights read): family, layer graph, shapes, dtypes, size, structural
    class and fit cost. --weights adds ranks, degenerate layers and residual-branch gains."""
    from dynaudit.api import inspect as run
    from dynaudit.reports.inspect import render_inspection
    from dynaudit.reports.render import JSON, Terminal, publish

    source, inputs = _read(source, revision, base)
    guard_outputs({"--json": json_path}, inputs)
    found = run(
        source,
        family=family,
        base=base,
        weights=weights,
        **fit.settings(),
        sources=reach.options(),
    )
    table = None if quiet else Terminal(render_inspection)
    publish(found, {"--json": (json_path, JSON)}, inputs, table)
    return ExitCode.OK


@app.command(epilog=_EPILOG)
def plot(
    inputs: flags.PlotInputs,
    out: flags.PlotOut = Path("dynaudit.png"),
    layer: flags.PlotLayer = None,
    method: flags.PlotMethod = "pca",
) -> int:
    """PNG plots: base vs checked per layer, a trajectory over reports, a neuron map."""
    from dynaudit.reports.plots import check_method, plot_for
    from dynaudit.reports.render import render_report

    check_method(method)
    read = Inputs()
    for path in inputs:  # a baseline directory is an input as a whole
        (read.add_tree if path.is_dir() else read.add_file)(path, "the plot input")
    guard_outputs({"--out": out}, read)
    reporter, document = plot_for(inputs, layer, method)
    written = render_report(out, reporter, document)
    typer.echo(f"wrote {written}", err=is_stdout(out))
    return ExitCode.OK


@app.command()
def plugins() -> int:
    """Installed family plugins and where they come from."""
    from dynaudit.families import available_families
    from dynaudit.reports.plugins import render_plugins
    from dynaudit.reports.render import Terminal, show

    show(Terminal(render_plugins), available_families())
    return ExitCode.OK


@app.command()
def demo(out: flags.DemoOut = None) -> int:
    """Build a tiny trained checkpoint locally (no network) and audit it."""
    import tempfile

    from dynaudit.api import measure as run
    from dynaudit.demo import build_demo_checkpoint, refuse_foreign
    from dynaudit.reports import render_terminal
    from dynaudit.reports.progress import progress_bar
    from dynaudit.reports.render import Terminal, show

    if out is not None:
        guard_outputs({"--out": out}, Inputs(), directory=True)  # `-`, a parent that is a file
        refuse_foreign(out)  # never over a checkpoint or anything else the user had
    with tempfile.TemporaryDirectory(prefix="dynaudit-demo-") as tmp:
        target = out or Path(tmp) / "demo-mlp"
        typer.echo(f"building a tiny trained checkpoint in {target} ...", err=True)
        accuracy = build_demo_checkpoint(target)
        typer.echo(f"trained: held-out accuracy {accuracy:.1%}; auditing it:", err=True)
        with progress_bar() as progress:
            report = run(str(target), progress=progress, seeds=2, cache=False)
        show(Terminal(render_terminal), report)
    return ExitCode.OK


def _read(source: str, revision: str | None, base: str | None) -> tuple[str, Inputs]:
    """SOURCE with ``--revision`` folded into its URI, which every later step (and the
    report's ``source.uri``) reads, and what the run reads so far, which no output may be.
    The revision is no source option: an adapter's base and ``--baseline`` never inherit it."""
    from dynaudit.sources import with_revision

    pinned = with_revision(source, revision)  # None: SOURCE as given
    inputs = Inputs()
    inputs.add_source(pinned, base)
    return pinned, inputs


@contextlib.contextmanager
def _fitting() -> Iterator[tuple[bool, Callable[[int, int, str], None] | None]]:
    """Under torchrun every rank fits its share and rank 0 alone reports: whether this is
    rank 0, and the progress bar it shows."""
    from dynaudit.distributed import is_main
    from dynaudit.reports.progress import progress_bar

    main_rank = is_main()
    with progress_bar() if main_rank else contextlib.nullcontext() as progress:
        yield main_rank, progress
