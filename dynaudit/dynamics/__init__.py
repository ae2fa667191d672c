"""The method's mathematics as pure tensor functions: no I/O, no global state.

- :mod:`.kernel`: the alternating piece-wise distance and the seeded Adam fit.
- :mod:`.metrics`: discrepancy, mean distance and fidelity of fitted coordinates.
"""

from dynaudit.dynamics.kernel import fit_coordinates, init_coordinates, reconstruct
from dynaudit.dynamics.metrics import discrepancy, fidelity

__all__ = ["discrepancy", "fidelity", "fit_coordinates", "init_coordinates", "reconstruct"]
