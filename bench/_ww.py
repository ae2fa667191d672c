"""Run WeightWatcher's ``analyze()`` on a checkpoint directory, as a whole process.

``python -m bench._ww DIR OUT.json``. WeightWatcher 0.7.7 reads a directory holding
``model*.safetensors`` itself (lazily, one tensor at a time through ``safe_open``), so no
model class or state-dict loading is needed: the whole-process time is import + read + analyze.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

_STARTED = time.perf_counter()


def _blas() -> list[dict[str, object]]:
    """Which BLAS numpy/scipy run, and with how many threads (when threadpoolctl is there)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("internal_api", "num_threads", "version", "architecture")
    return [{k: info.get(k) for k in keep} for info in threadpool_info()]


def main() -> int:
    directory, out = Path(sys.argv[1]), Path(sys.argv[2])
    import weightwatcher

    imported = time.perf_counter()
    watcher = weightwatcher.WeightWatcher(model=str(directory))
    details = watcher.analyze()  # defaults: power-law fit of every layer's ESD, no plots
    finished = time.perf_counter()
    out.write_text(
        json.dumps(
            {
                "version": weightwatcher.__version__,
                "import_s": imported - _STARTED,
                "analyze_s": finished - imported,
                "layers": [str(name) for name in details["name"]],
                "alpha": [float(a) for a in details["alpha"]],
                "blas": _blas(),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
