"""``dynaudit serve``: the registry gate's webhook receiver (docs/registry.md).

A registry event (an MLflow model version created or an alias moved, a push to a Hub model
repository) becomes a durable job; a worker runs ``dynaudit check`` on it in a process of its
own and writes the verdict back where the reviewer looks: tags on the model version and a report
run, or a comment on the Hub repository's dynaudit discussion.

- :mod:`~dynaudit.serve.verify` and :mod:`~dynaudit.serve.events`: who may call, and what
  was said (pure).
- :mod:`~dynaudit.serve.store`: the jobs, in SQLite by default (any SQLAlchemy URL).
- :mod:`~dynaudit.serve.worker`: jobs to checks, each in its own process with a timeout.
- :mod:`~dynaudit.serve.writeback`: verdicts to tags, runs, comments; the promotion guard.
- :mod:`~dynaudit.serve.app`: the HTTP routes.

The HTTP stack (Starlette, uvicorn) and SQLAlchemy come with the ``serve`` extra and are
imported only here, when the receiver starts."""

from __future__ import annotations

from dynaudit.errors import ExitCode
from dynaudit.serve.settings import ServeSettings, require_extra

__all__ = ["ServeSettings", "run"]


def run(settings: ServeSettings) -> ExitCode:
    """Listen until SIGTERM or Ctrl-C; a job in progress then goes back to the queue and runs
    again at the next start (its check process is stopped)."""
    settings.validate()
    require_extra()
    from dynaudit.serve.app import serve_forever

    return serve_forever(settings)
