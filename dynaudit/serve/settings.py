"""What ``dynaudit serve`` is told at start-up, checked before anything listens."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path

from dynaudit.errors import UsageError

__all__ = ["DEFAULT_PORT", "ServeSettings", "require_extra"]

DEFAULT_PORT = 8750
_EXTRA = ("starlette", "uvicorn", "sqlalchemy")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Everything the receiver is told at start-up (``dynaudit serve --help``)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    mlflow_uri: str | None = None
    mlflow_secret: str | None = dataclasses.field(default=None, repr=False)
    hub_secret: str | None = dataclasses.field(default=None, repr=False)
    ops_token: str | None = dataclasses.field(default=None, repr=False)
    db: str | None = None  # default: sqlite:///<state_dir>/serve.db
    state_dir: Path = Path("dynaudit-serve")
    workers: int = 1
    job_timeout: float = 3600.0
    max_attempts: int = 3
    max_body: int = 1 << 20
    writeback_retries: int = 5
    guards: tuple[str, ...] = ()
    watch: tuple[str, ...] = ()  # registered models swept for versions no event announced
    sweep_every: float = 300.0
    hub_branches: tuple[str, ...] = ("main",)
    hf_endpoint: str | None = None
    hf_token: str | None = dataclasses.field(default=None, repr=False)
    launcher: tuple[str, ...] = ()
    check_args: tuple[str, ...] = ()  # --config, --device, --threads for every check

    @property
    def database(self) -> str:
        return self.db or f"sqlite:///{(self.state_dir / 'serve.db').resolve()}"

    def validate(self) -> None:
        """Refuse, before anything listens, a receiver that could not do its job."""
        if not (self.mlflow_secret or self.hub_secret):
            raise UsageError(
                "dynaudit serve needs a webhook secret: --secret (both sources), or "
                "--mlflow-secret / --hub-secret (DYNAUDIT_MLFLOW_WEBHOOK_SECRET, "
                "DYNAUDIT_HUB_WEBHOOK_SECRET)"
            )
        if self.mlflow_secret and not self.mlflow_uri:
            raise UsageError(
                "MLflow webhooks need the registry to write verdicts to: --mlflow-uri URI "
                "(or MLFLOW_TRACKING_URI)"
            )
        for name, value in (
            ("--workers", self.workers),
            ("--max-attempts", self.max_attempts),
            ("--max-body", self.max_body),
            ("--job-timeout", self.job_timeout),
        ):
            if value <= 0:
                raise UsageError(f"{name} must be positive, not {value}")
        if self.watch and not self.mlflow_uri:
            raise UsageError(
                "--watch needs the registry: --mlflow-uri URI (or MLFLOW_TRACKING_URI)"
            )
        if self.sweep_every <= 0:
            raise UsageError(f"--sweep-every must be positive, not {self.sweep_every}")
        if self.writeback_retries < 0:
            raise UsageError(f"--writeback-retries must be 0 or more, not {self.writeback_retries}")
        if self.launcher and shutil.which(self.launcher[0]) is None:
            raise UsageError(
                f"--launcher: {self.launcher[0]!r} is not a program on PATH (give its full path)"
            )
        if not 0 < self.port < 65536:
            raise UsageError(f"--port must be 1-65535, not {self.port}")


def require_extra() -> None:
    """The ``serve`` extra's packages, or one line saying how to install them."""
    missing = [name for name in _EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"dynaudit serve needs {', '.join(missing)}: install the serve extra, "
            "pip install 'dynaudit[serve]' (from a checkout: pip install '.[serve]')"
        )
