"""The listing of ``dynaudit plugins``: each installed family, where it comes from, and what
it audits, or why it failed to load."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console

from dynaudit.reports.escape import plain

__all__ = ["render_plugins"]


def render_plugins(families: Mapping[str, str], console: Console) -> None:
    """``families``: each entry point's name and origin. A plugin that fails to load is listed
    with its one-line error in red, not raised: the listing is how a user finds it."""
    from dynaudit.errors import DynauditError
    from dynaudit.families import get_family

    console.print("family plugins (entry-point group dynaudit.plugins):")
    for name, origin in families.items():
        try:
            about, style = get_family(name).description, ""
        except DynauditError as exc:
            about, style = f"failed to load: {exc.message}", "red"
        console.print(plain(name, style="bold"), plain(f"  {origin}"), soft_wrap=True)
        console.print(plain(f"    {about}", style=style), soft_wrap=True)
