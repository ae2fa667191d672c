"""The progress bar over layers that a fit shows on stderr while a person watches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

__all__ = ["progress_bar"]


@contextlib.contextmanager
def progress_bar() -> Iterator[Callable[[int, int, str], None] | None]:
    """A rich progress bar over layers on an interactive terminal (the callback the api's
    ``progress`` takes); None, and nothing drawn, in CI and pipes."""
    from dynaudit.console import interactive

    if not interactive():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from dynaudit.errors import printable

    bar = Progress(
        TextColumn("fitting"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[layer]}", markup=False),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("fit", total=None, layer="")

    def update(done: int, total: int, layer: str) -> None:
        bar.update(task, completed=done, total=total, layer=printable(layer))

    with bar:
        yield update
