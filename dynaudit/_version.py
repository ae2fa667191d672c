"""dynaudit's version, in one place: pyproject.toml reads it (``[tool.setuptools.dynamic]``),
``dynaudit.__version__`` re-exports it, and the reports, baselines and cache keys record it.
A leaf module, so that any module can import it without importing the package's facade."""

__version__ = "0.1.0"
