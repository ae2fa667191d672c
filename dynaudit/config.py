"""Settings: those of the method protocol (docs/method.md), validated once at the API boundary, and
the one reader of settings files (``[tool.dynaudit]`` of ./pyproject.toml, ``--config FILE``,
``--policy FILE``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dynaudit.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "PROTOCOL_VERSION",
    "PYPROJECT",
    "FitSettings",
    "project_setting",
    "read_table",
    "read_toml",
]

# Bump whenever a change moves the numbers: reports and baselines of different protocol
# versions are never compared.
PROTOCOL_VERSION = 3  # 2: matrices above max_entries fitted on seeded blocks; 3: H = 16, 600 steps


class FitSettings(BaseModel):
    """How each layer's dynamical system is fitted. Defaults: see docs/method.md."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    q_dim: int = Field(128, ge=2, le=4096, description="coordinate dimension of each neuron")
    pieces: int = Field(16, ge=2, le=512, description="H, pieces of the alternating distance")
    mu: float = Field(0.03, gt=0, description="weight of the mean squared coordinate norm")
    steps: int = Field(600, ge=1, le=1_000_000, description="Adam steps per fit")
    lr: float = Field(0.05, gt=0, description="peak learning rate, in units of RMS(W/s)")
    warm_steps: int = Field(
        100, ge=1, le=1_000_000, description="Adam steps of a warm refit (comparisons, §4.9)"
    )
    warm_lr: float = Field(
        0.005, gt=0, description="peak learning rate of a warm refit, in units of RMS(W/s)"
    )
    seed: int = Field(0, ge=0, description="seed of the first cold fit")
    seeds: int = Field(1, ge=1, le=64, description="cold fits per layer (spread when > 1)")
    max_entries: int = Field(
        1 << 20,
        ge=0,
        description="largest matrix fitted whole; larger ones are fitted on a seeded block of "
        "about this many entries (0: every matrix whole)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch threads (default: torch's)")
    tile_bytes: int = Field(
        256 * 1024 * 1024, ge=1024 * 1024, description="memory bound of one fit's work buffer"
    )

    @model_validator(mode="after")
    def _pieces_fit_q_dim(self) -> FitSettings:
        if self.pieces % 2:
            raise ValueError(
                f"pieces (H) must be even: odd H biases the distance negative (got {self.pieces})"
            )
        if self.q_dim % self.pieces:
            raise ValueError(f"pieces ({self.pieces}) must divide q_dim ({self.q_dim})")
        return self

    @property
    def piece_dim(self) -> int:
        return self.q_dim // self.pieces

    def numeric(self) -> dict[str, object]:
        """The settings that change the numbers (device and threads only within tolerance)."""
        return self.model_dump(exclude={"device", "threads", "tile_bytes"})


# -- settings files ---------------------------------------------------------------------

# The project file whose [tool.dynaudit] table holds settings, the policy and the baseline.
PYPROJECT = Path("pyproject.toml")


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """The TOML file ``path`` as a table, read once; one that cannot be read or parsed is a
    usage error naming the file and ``what`` it was read for."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: cannot read {what} ({exc})") from exc


def read_table(path: Path, *, explicit: bool) -> dict[str, Any]:
    """The dynaudit table of ``path``: ``[tool.dynaudit]`` when the file has one, else (for a
    file named with ``--config``, ``explicit``) its top level. An implicit ./pyproject.toml
    without the table gives nothing; a file that cannot be read or parsed, or whose
    ``tool.dynaudit`` is not a table, is a usage error."""
    data = read_toml(path, "the settings")
    tool = data.get("tool")
    table = tool.get("dynaudit") if isinstance(tool, dict) else None
    if isinstance(table, dict):
        return dict(table)
    if table is not None:
        raise UsageError(f"{path}: tool.dynaudit must be a table ([tool.dynaudit])")
    return dict(data) if explicit else {}


def project_setting(key: str) -> Any:
    """``key`` of ``[tool.dynaudit]`` in ./pyproject.toml; None when the file or key is absent."""
    return read_table(PYPROJECT, explicit=False).get(key) if PYPROJECT.is_file() else None
