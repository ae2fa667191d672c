"""Performance benchmark of dynaudit against WeightWatcher: ``python -m bench.run [--quick]``.

See ``docs/performance.md`` for what is measured and how to read the results.
"""
