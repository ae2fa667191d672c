"""The command line every experiment shares: ``--quick``, ``--out JSON``, ``--plot PNG``.

Each experiment module provides ``run(quick, work_dir) -> dict`` (JSON-serialisable), a
``show(result)`` that prints the headline figures and, if it draws one, ``plot(result, path)``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Result = dict[str, Any]


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, imported when a figure is asked for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out: Path) -> None:
    """Lay out, write as PNG (creating the folder) and release the figure."""
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    pyplot().close(fig)


def experiment_main(
    doc: str | None,
    name: str,
    run: Callable[[bool, Path], Result],
    show: Callable[[Result], None],
    plot: Callable[[Result, Path], None] | None = None,
    argv: Sequence[str] | None = None,
) -> Result:
    """Parse the shared options, run in a temporary work directory, print, and write the
    JSON (and the figure) where asked."""
    parser = argparse.ArgumentParser(description=(doc or name).splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run for CI (< 2 min)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    if plot is not None:
        parser.add_argument("--plot", type=Path, help="write the figure (PNG) here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix=f"dynaudit-{name}-") as tmp:
        result = run(args.quick, Path(tmp))
    show(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if plot is not None and args.plot:
        plot(result, args.plot)
    return result
