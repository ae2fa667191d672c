"""The command line's flags, each declared once, and the groups several commands share.

Typer reads a command's flags from its signature and has no option groups: :func:`grouped`
lets a parameter annotated with a flag group (a frozen dataclass below) stand for all of that
group's flags, in its place, so ``check`` and ``compare`` list the gate's thresholds once, here.
A flag that the environment and the settings file can set too gets its variable's name from
the flag (:func:`setting`)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_type_hints

import typer

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's own from Python 3.11

    from dynaudit.api import FitOptions
    from dynaudit.reports.render import Reporter
    from dynaudit.schema import CheckReport, Policy
    from dynaudit.sources import SourceOptions

__all__ = [
    "BaselineFitting",
    "CheckRun",
    "Fit",
    "Fitting",
    "HubWriteBack",
    "Reach",
    "Serving",
    "Thresholds",
    "grouped",
    "origin",
    "paths",
    "setting",
]


def setting(flag: str, metavar: str, help: str) -> Any:
    """An option that the environment (``DYNAUDIT_`` and the flag's name: ``--q-dim`` →
    ``DYNAUDIT_Q_DIM``) and the settings file can set too (:mod:`dynaudit.cli.settings`)."""
    return typer.Option(flag, metavar=metavar, envvar=_variable(flag), help=help)


def _variable(flag: str) -> str:
    return "DYNAUDIT_" + flag.removeprefix("--").replace("-", "_").upper()


def _path(flag: str, help: str, metavar: str = "PATH") -> Any:
    return typer.Option(flag, metavar=metavar, help=help)


Source = Annotated[
    str,
    typer.Argument(
        metavar="SOURCE",
        help="checkpoint: a .safetensors file or directory, hf://org/name[@rev][/path] or org/name "
        "(Hugging Face Hub), models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest, "
        "models:/m-ID or runs:/RUN_ID/PATH (MLflow)",
    ),
]
Revision = Annotated[
    str | None,
    typer.Option(
        "--revision",
        metavar="REV",
        help="Hub revision of SOURCE: a branch, tag, commit or refs/pr/N (the same as "
        "hf://org/name@REV)",
    ),
]
Family = Annotated[
    str | None, setting("--family", "NAME", "family plugin to use (default: detected)")
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
    setting("--device", "auto|cpu|cuda", "where fits run: auto (cuda when available), cpu or cuda"),
]
QDim = Annotated[int | None, setting("--q-dim", "N", "coordinate dimension q_dim")]
Pieces = Annotated[int | None, setting("--pieces", "H", "pieces H (even, divides q_dim)")]
Steps = Annotated[int | None, setting("--steps", "N", "Adam steps per fit")]
MaxEntries = Annotated[
    int | None,
    setting(
        "--max-entries",
        "N",
        "fit larger matrices on a seeded block of about this many entries (0: whole; "
        "default 1048576)",
    ),
]
Seed = Annotated[int | None, setting("--seed", "N", "seed of the first cold fit")]
Seeds = Annotated[int | None, setting("--seeds", "K", "cold fits per layer; >1 reports the spread")]
Threads = Annotated[int | None, setting("--threads", "N", "torch threads (default: torch's)")]
JsonOut = Annotated[Path | None, _path("--json", "write the JSON report here (-: stdout)")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no table on stdout")]
NoCache = Annotated[
    bool, typer.Option("--no-cache", help="always fit, never reuse or store a cached result")
]
LogMlflow = Annotated[
    bool,
    typer.Option(
        "--mlflow",
        help="log metrics, settings, tags and the reports to MLflow (--mlflow-uri or "
        "MLFLOW_TRACKING_URI; the active run, else a new run in MLFLOW_EXPERIMENT_NAME)",
    ),
]


MarkdownOut = Annotated[
    Path | None, typer.Option("--markdown", help="write the Markdown report here (-: stdout)")
]
Layers = Annotated[
    str | None,
    typer.Option(
        "--layers",
        metavar="REGEX",
        help="measure only the layers whose names match this regular expression (searched)",
    ),
]
Experts = Annotated[
    str | None,
    typer.Option(
        "--experts",
        metavar="LIST",
        help="mixture of experts: measure only these experts, in every block (indices and "
        "ranges: 0,3 or 0-7); the router, shared experts and attention are left out",
    ),
]


# The settings callback's own flags.
def _show_version(value: bool) -> None:
    if value:
        from dynaudit._version import __version__

        typer.echo(f"dynaudit {__version__}")
        raise typer.Exit()


Version = Annotated[
    bool,
    typer.Option(
        "--version", callback=_show_version, is_eager=True, help="print the version and exit"
    ),
]
Config = Annotated[
    Path | None,
    setting(
        "--config",
        "FILE",
        "settings file: [tool.dynaudit] of a pyproject.toml, or the same keys at the top "
        "level of any TOML file (default: ./pyproject.toml); flags and DYNAUDIT_* "
        "variables win over it",
    ),
]


def _set_verbosity(verbose: int) -> int:
    """``-v`` logs what is read and reused, ``-vv`` also debug detail and the traceback of an
    internal error; for this run only (:func:`dynaudit.cli.main` puts it back)."""
    if verbose:
        logging.getLogger("dynaudit").setLevel(logging.INFO if verbose == 1 else logging.DEBUG)
    if verbose > 1:
        from dynaudit.cli._errors import show_tracebacks

        show_tracebacks(True)
    return verbose


Verbose = Annotated[
    int,
    typer.Option(
        "--verbose",
        "-v",
        count=True,
        callback=_set_verbosity,
        help="say more on stderr: -v what is read and reused, -vv also debug detail and "
        "tracebacks of internal errors",
    ),
]

# baseline
BaselineOut = Annotated[
    Path | None,
    typer.Option("--out", metavar="DIR", help="baseline directory to create (never overwritten)"),
]
BaselineSeeds = Annotated[
    int | None, setting("--seeds", "K", "K cold fits (and null refits) per layer (default 3)")
]
StoreMlflow = Annotated[
    bool,
    typer.Option(
        "--mlflow",
        help="store it as the artifacts of a new MLflow run (and tag the model version "
        "when SOURCE is one); prints the runs:/ URI to use as --baseline",
    ),
]
Experiment = Annotated[
    str | None,
    typer.Option(metavar="NAME", help="MLflow experiment (default: MLFLOW_EXPERIMENT_NAME)"),
]

# check, compare, inspect
BaselineRef = Annotated[
    str | None,
    setting(
        "--baseline",
        "REF",
        "baseline directory, or a checkpoint (any SOURCE form) measured as one; default: "
        "[tool.dynaudit] baseline, the MLflow version's dynaudit.baseline tag, the adapter's "
        "base, the model card's base_model",
    ),
]
Reference = Annotated[
    str, typer.Argument(metavar="A", help="the reference checkpoint (measured as the baseline)")
]
Compared = Annotated[str, typer.Argument(metavar="B", help="the checkpoint to compare with it")]
Weights = Annotated[
    bool,
    typer.Option("--weights", help="also read the weights: ranks, degenerate layers, branch gains"),
]

# plot, demo
PlotInputs = Annotated[
    list[Path],
    typer.Argument(
        metavar="INPUT",
        help="a check report (JSON) → per-layer bars; several measure reports (JSON) → "
        "trajectory; a baseline directory → neuron map",
    ),
]
PlotOut = Annotated[
    Path, typer.Option("--out", metavar="PATH", help="PNG file to write (-: standard output)")
]
PlotLayer = Annotated[str | None, typer.Option(help="neuron map: the layer (default: the first)")]
PlotMethod = Annotated[str, typer.Option(help="neuron map: pca, or tsne (scikit-learn); no other")]
DemoOut = Annotated[
    Path | None,
    typer.Option(
        help="a new or empty directory to build the demo checkpoint in (default: temporary)"
    ),
]


def grouped(command: Callable[..., int]) -> Callable[..., int]:
    """``command`` as Typer should see it: each parameter annotated with a flag group replaced
    by the group's flags (keyword-only, in the group's order), which are gathered back into
    one group instance when the command runs."""
    signature = inspect.signature(command, eval_str=True)
    groups: dict[str, Any] = {}
    flags: list[inspect.Parameter] = []
    for param in signature.parameters.values():
        group = param.annotation
        if not (isinstance(group, type) and dataclasses.is_dataclass(group)):
            flags.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            continue
        groups[param.name] = group
        hints = get_type_hints(group, include_extras=True)
        flags += [
            inspect.Parameter(
                field.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=field.default,
                annotation=hints[field.name],
            )
            for field in dataclasses.fields(group)
        ]

    @functools.wraps(command)
    def gathered(**given: Any) -> int:
        for name, group in groups.items():
            names = [field.name for field in dataclasses.fields(group)]
            given[name] = group(**{key: given.pop(key) for key in names})
        return command(**given)

    gathered.__signature__ = signature.replace(parameters=flags)  # type: ignore[attr-defined]
    gathered.__annotations__ = {p.name: p.annotation for p in flags}
    return gathered


@dataclasses.dataclass(frozen=True)
class Fit:
    """The fit settings that compare and inspect (for its cost) take."""

    q_dim: QDim = None
    pieces: Pieces = None
    steps: Steps = None
    max_entries: MaxEntries = None
    seeds: Seeds = None

    def settings(self, **more: Unpack[FitOptions]) -> FitOptions:
        """These and ``more`` as the api's fit settings (None: its default)."""
        return {
            "q_dim": self.q_dim,
            "pieces": self.pieces,
            "steps": self.steps,
            "max_entries": self.max_entries,
            "seeds": self.seeds,
            **more,
        }


@dataclasses.dataclass(frozen=True)
class Fitting:
    """Every fit setting a flag can give: measure's."""

    device: Device = "auto"
    q_dim: QDim = None
    pieces: Pieces = None
    steps: Steps = None
    max_entries: MaxEntries = None
    seed: Seed = None
    seeds: Seeds = None
    threads: Threads = None

    def settings(self) -> FitOptions:
        """As the api's fit settings (None: its default)."""
        given = Fit(self.q_dim, self.pieces, self.steps, self.max_entries, self.seeds)
        return given.settings(device=self.device, seed=self.seed, threads=self.threads)


@dataclasses.dataclass(frozen=True)
class BaselineFitting(Fitting):
    """Every fit setting, with the baseline's own default K (more seeds than a measurement)."""

    seeds: BaselineSeeds = None


@dataclasses.dataclass(frozen=True)
class Reach:
    """How remote SOURCEs are reached and what may be read: every command that opens one."""

    hf_endpoint: Annotated[
        str | None,
        typer.Option(
            "--hf-endpoint",
            metavar="URL",
            envvar="HF_ENDPOINT",
            help="Hugging Face Hub URL (default: the Hub)",
        ),
    ] = None
    hf_token: Annotated[
        str | None,
        typer.Option(
            "--hf-token",
            metavar="TOKEN",
            help="Hub token (default: HF_TOKEN; prefer the variable: flags show in process lists)",
            show_default=False,
        ),
    ] = dataclasses.field(default=None, repr=False)  # never printed
    mlflow_uri: Annotated[
        str | None,
        typer.Option(
            "--mlflow-uri",
            metavar="URI",
            envvar="MLFLOW_TRACKING_URI",
            help="MLflow tracking server (also the registry, unless MLFLOW_REGISTRY_URI is set)",
        ),
    ] = None
    cache_dir: Annotated[
        Path | None,
        setting(
            "--cache-dir",
            "DIR",
            "result and download cache (default: $HF_HOME/assets/dynaudit when HF_HOME is set, "
            "else ~/.cache/dynaudit)",
        ),
    ] = None
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="read pickle weights (.bin/.pt) with torch.load(weights_only=True), which "
            "builds tensors only and runs no code from the file; refused otherwise",
        ),
    ] = False
    state_dict_key: Annotated[
        str | None,
        setting(
            "--state-dict-key",
            "KEY",
            "the key of a training checkpoint (a pickle with --allow-pickle, or safetensors "
            "with flattened names) that holds the model's weights (default: the first state dict "
            "among model_state_dict, state_dict, model, module, ema, model_ema)",
        ),
    ] = None

    def options(self) -> SourceOptions:
        from dynaudit.sources import SourceOptions

        return SourceOptions(**dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The gate's policy file and the flags that override its thresholds (check, compare)."""

    policy_path: Annotated[
        Path | None,
        setting(
            "--policy",
            "FILE",
            "TOML gate policy (default: [tool.dynaudit.policy] of the settings file)",
        ),
    ] = None
    max_drop_all: Annotated[
        float | None, setting("--max-drop-all", "PCT", "% drop of all layers that fails")
    ] = None
    max_drop_group: Annotated[
        float | None, setting("--max-drop-group", "PCT", "% drop of a depth third that fails")
    ] = None
    max_layer_change: Annotated[
        float | None,
        setting("--max-layer-change", "PCT", "% change of any layer, either direction, that fails"),
    ] = None
    max_displacement: Annotated[
        float | None,
        setting(
            "--max-displacement",
            "X",
            "neuron displacement of any layer that fails (units of its mean distance)",
        ),
    ] = None
    max_weight_change: Annotated[
        float | None,
        setting(
            "--max-weight-change",
            "PCT",
            "% a layer's weights may move, ‖ΔW‖/‖W‖, before it counts as replaced",
        ),
    ] = None
    max_noise_change: Annotated[
        float | None,
        setting(
            "--max-noise-change",
            "PCT",
            "% a layer's weights may move in a noise-like way before it is damage",
        ),
    ] = None

    def policy(self, settings: Path | None) -> Policy:
        """The policy these flags give over the policy file (``settings``: ``--config``)."""
        from dynaudit.gate import load_policy

        overrides = dataclasses.asdict(self)
        return load_policy(overrides.pop("policy_path"), settings=settings, **overrides)


@dataclasses.dataclass(frozen=True)
class CheckRun:
    """Where check and compare put their verdict (report files, MLflow, the table) and how
    they reuse and refit the baseline."""

    json_path: JsonOut = None
    markdown_path: Annotated[
        Path | None, _path("--markdown", "write the Markdown report here (-: stdout)")
    ] = None
    junit_path: Annotated[
        Path | None,
        _path("--junit", "write JUnit XML here, a test case per group (-: stdout)"),
    ] = None
    log_mlflow: LogMlflow = False
    no_cache: Annotated[
        bool,
        typer.Option(
            "--no-cache",
            help="measure a checkpoint baseline afresh and do not keep it (default: kept in the "
            "cache and reused)",
        ),
    ] = False
    all_seeds: Annotated[
        bool,
        typer.Option(
            "--all-seeds",
            help="refit every baseline seed of every changed layer (default: seed 0 first, the "
            "others only where a verdict is near a threshold)",
        ),
    ] = False
    quiet: Quiet = False

    def files(self) -> dict[str, tuple[Path | None, Reporter[CheckReport]]]:
        """Each report flag's path (None: not asked for) and the format it writes."""
        from dynaudit.reports.check import render_check_markdown
        from dynaudit.reports.ci import render_junit
        from dynaudit.reports.render import JSON, Text

        return {
            "--json": (self.json_path, JSON),
            "--markdown": (self.markdown_path, Text(render_check_markdown)),
            "--junit": (self.junit_path, Text(render_junit)),
        }


@dataclasses.dataclass(frozen=True)
class HubWriteBack:
    """Where check writes its verdict back on the Hub repository it checked (hf:// only)."""

    hub_comment: Annotated[
        bool,
        typer.Option(
            "--hub-comment",
            help="post the Markdown report to a discussion of the checked hf:// repository, "
            "updated in place by later checks (token: --hf-token or HF_TOKEN, with write access)",
        ),
    ] = False
    hub_pr: Annotated[
        bool,
        typer.Option(
            "--hub-pr",
            help="open a pull request adding a dynaudit: block (verdict, summary, baseline, "
            "version) to the model card of the checked hf:// repository, the report as its "
            "description; an open one from an earlier check is updated instead",
        ),
    ] = False

    def check(self, source: str) -> None:
        """Either flag needs an ``hf://`` SOURCE: a usage error, before anything is fitted."""
        from dynaudit.hub_comments import require_hub_source

        for flag, given in (("--hub-comment", self.hub_comment), ("--hub-pr", self.hub_pr)):
            if given:
                require_hub_source(source, flag)


def _serve(flag: str, metavar: str, help: str, envvar: str | None = None) -> Any:
    return typer.Option(flag, metavar=metavar, envvar=envvar, help=help, show_default=False)


@dataclasses.dataclass(frozen=True)
class Serving:
    """``dynaudit serve``: where it listens, who may call it, where jobs live, how checks run."""

    host: Annotated[
        str,
        typer.Option(
            "--host", metavar="ADDR", help="address to listen on (0.0.0.0: every interface)"
        ),
    ] = "127.0.0.1"
    port: Annotated[int, typer.Option("--port", metavar="N", help="port to listen on")] = 8750
    mlflow_uri: Annotated[
        str | None,
        typer.Option(
            "--mlflow-uri",
            metavar="URI",
            envvar="MLFLOW_TRACKING_URI",
            help="MLflow tracking server whose registry sends webhooks and gets the verdicts",
        ),
    ] = None
    secret: Annotated[
        str | None,
        _serve(
            "--secret",
            "SECRET",
            "webhook secret of both sources (prefer the variable: flags show in process lists)",
            "DYNAUDIT_SECRET",
        ),
    ] = dataclasses.field(default=None, repr=False)
    mlflow_secret: Annotated[
        str | None,
        _serve(
            "--mlflow-secret",
            "SECRET",
            "the MLflow webhook's secret (default: --secret)",
            "DYNAUDIT_MLFLOW_WEBHOOK_SECRET",
        ),
    ] = dataclasses.field(default=None, repr=False)
    hub_secret: Annotated[
        str | None,
        _serve(
            "--hub-secret",
            "SECRET",
            "the Hub webhook's secret (default: --secret)",
            "DYNAUDIT_HUB_WEBHOOK_SECRET",
        ),
    ] = dataclasses.field(default=None, repr=False)
    ops_token: Annotated[
        str | None,
        _serve(
            "--ops-token",
            "TOKEN",
            "bearer token for GET /jobs (no token: /jobs is off)",
            "DYNAUDIT_OPS_TOKEN",
        ),
    ] = dataclasses.field(default=None, repr=False)
    db: Annotated[
        str | None,
        _serve(
            "--db",
            "URL",
            "SQLAlchemy URL of the job store (default: sqlite:///STATE_DIR/serve.db; "
            "postgresql+psycopg://... for replicas sharing one)",
            "DYNAUDIT_SERVE_DB",
        ),
    ] = None
    state_dir: Annotated[
        Path,
        typer.Option(
            "--state-dir", metavar="DIR", help="the database and each job's reports and logs"
        ),
    ] = Path("dynaudit-serve")
    workers: Annotated[int, typer.Option("--workers", metavar="N", help="checks run at once")] = 1
    job_timeout: Annotated[
        float,
        typer.Option(
            "--job-timeout", metavar="SECONDS", help="a check still running after this is stopped"
        ),
    ] = 3600.0
    max_attempts: Annotated[
        int,
        typer.Option(
            "--max-attempts", metavar="N", help="a job whose check crashes this often is given up"
        ),
    ] = 3
    max_body: Annotated[
        int,
        typer.Option("--max-body", metavar="BYTES", help="largest webhook body taken (413 beyond)"),
    ] = 1 << 20
    writeback_retries: Annotated[
        int,
        typer.Option(
            "--writeback-retries",
            metavar="N",
            help="retries of a registry call that failed (backoff up to 16 s)",
        ),
    ] = 5
    guard: Annotated[
        list[str] | None,
        typer.Option(
            "--guard",
            metavar="ALIAS",
            help="move this MLflow alias back when it lands on a failing version (repeatable)",
        ),
    ] = None
    watch: Annotated[
        list[str] | None,
        typer.Option(
            "--watch",
            metavar="MODEL",
            help="also look for unchecked versions of this registered model at start-up and "
            "every --sweep-every seconds, for events MLflow gave up delivering (repeatable)",
        ),
    ] = None
    sweep_every: Annotated[
        float, typer.Option("--sweep-every", metavar="SECONDS", help="how often --watch looks")
    ] = 300.0
    hub_branch: Annotated[
        list[str] | None,
        typer.Option(
            "--hub-branch",
            metavar="BRANCH",
            help="Hub branches whose pushes are checked (repeatable; default: main)",
        ),
    ] = None
    hf_endpoint: Annotated[
        str | None,
        typer.Option(
            "--hf-endpoint",
            metavar="URL",
            envvar="HF_ENDPOINT",
            help="Hugging Face Hub URL (default: the Hub)",
        ),
    ] = None
    launcher: Annotated[
        str | None,
        typer.Option(
            "--launcher",
            metavar="COMMAND",
            help="runs each check instead of this Python, e.g. "
            "'torchrun --standalone --nproc-per-node 4' (the module and its flags follow)",
        ),
    ] = None

    def settings(self, config: Path | None, device: str, threads: int | None) -> Any:
        """The receiver's :class:`~dynaudit.serve.ServeSettings` (secrets remembered for
        scrubbing); every check gets ``--config``, ``--device`` and ``--threads``."""
        import os

        from dynaudit.serve.settings import ServeSettings

        check_args = ["--device", device] + (["--threads", str(threads)] if threads else [])
        if config is not None:
            check_args[:0] = ["--config", str(config.resolve())]
        return ServeSettings(
            host=self.host,
            port=self.port,
            mlflow_uri=self.mlflow_uri,
            mlflow_secret=self.mlflow_secret or self.secret,
            hub_secret=self.hub_secret or self.secret,
            ops_token=self.ops_token,
            db=self.db,
            state_dir=self.state_dir,
            workers=self.workers,
            job_timeout=self.job_timeout,
            max_attempts=self.max_attempts,
            max_body=self.max_body,
            writeback_retries=self.writeback_retries,
            guards=tuple(self.guard or ()),
            watch=tuple(self.watch or ()),
            sweep_every=self.sweep_every,
            hub_branches=tuple(self.hub_branch or ("main",)),
            hf_endpoint=self.hf_endpoint,
            hf_token=os.environ.get("HF_TOKEN") or None,
            launcher=_words("--launcher", self.launcher),
            check_args=tuple(check_args),
        )


def _words(flag: str, command: str | None) -> tuple[str, ...]:
    """A command line given as one string, split as a POSIX shell would (no shell runs it)."""
    import shlex

    from dynaudit.errors import UsageError

    try:
        return tuple(shlex.split(command)) if command else ()
    except ValueError as exc:
        raise UsageError(f"{flag} {command!r}: {exc}") from exc


def paths(files: Mapping[str, tuple[Path | None, object]]) -> dict[str, Path | None]:
    """The path of each report flag, for :func:`~dynaudit.outputs.guard_outputs`."""
    return {flag: path for flag, (path, _) in files.items()}


def origin(ctx: typer.Context, param: str, flag: str) -> str:
    """Where a setting's value came from, for a report: its flag, its variable, or the
    settings file."""
    given = getattr(ctx.get_parameter_source(param), "name", "")
    if given == "ENVIRONMENT":
        return _variable(flag)
    if given == "DEFAULT_MAP":
        where = ctx.meta.get("dynaudit.settings", "the settings file")
        return f"{flag.removeprefix('--')} in {where}"
    return flag
