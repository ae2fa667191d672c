"""Run the dynaudit CLI with an in-process anonymous-memory sampler.

``python -m bench._probe OUT.json [--interval S] -- measure PATH ...`` imports the CLI and
everything ``measure`` imports, records RssAnon, starts a sampler thread reading
``/proc/self/status`` every ``interval`` seconds, calls ``dynaudit.cli.main(argv)`` and writes
the samples' summary to OUT.json. The sampler only reads a small procfs file and sleeps, so it
holds the GIL for microseconds per sample while torch kernels run without it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

_STARTED = time.perf_counter()


def rss_anon_bytes(pid: str = "self") -> int:
    """RssAnon of a process from ``/proc/<pid>/status`` (resident anonymous memory)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc status (not Linux?)")


class Sampler(threading.Thread):
    """Tracks the peak of RssAnon until stopped."""

    def __init__(self, interval: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.interval = interval
        self.peak = rss_anon_bytes()
        self.samples = 1
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, rss_anon_bytes())
            self.samples += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, rss_anon_bytes())  # one last sample after the work


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._probe")
    parser.add_argument("out", type=Path, help="where to write the memory summary (JSON)")
    parser.add_argument("--interval", type=float, default=0.005, help="seconds between samples")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the dynaudit arguments")
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv

    # Import what `measure` imports before the baseline, so the baseline holds the libraries
    # (torch's anonymous memory included) and the difference is what the measurement needs.
    import torch  # noqa: F401

    import dynaudit.api
    import dynaudit.cli
    import dynaudit.cli.app
    import dynaudit.reports

    imported = time.perf_counter()
    baseline = rss_anon_bytes()
    sampler = Sampler(args.interval)
    sampler.start()
    code = dynaudit.cli.main(argv)
    sampler.stop()
    finished = time.perf_counter()
    args.out.write_text(
        json.dumps(
            {
                "exit_code": code,
                "argv": argv,
                "import_s": imported - _STARTED,
                "main_s": finished - imported,
                "rss_anon_after_imports": baseline,
                "rss_anon_peak": sampler.peak,
                "rss_anon_added": sampler.peak - baseline,
                "samples": sampler.samples,
                "interval_s": args.interval,
            },
            indent=2,
        )
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
