"""The engine: an opened checkpoint planned (:mod:`.plan`: which layers, which settings),
measured (:mod:`.measure`), made a baseline (:mod:`.baseline`) or compared with one
(:mod:`.compare`), layer by layer, streaming the tensors and sharding the layers over a
torchrun job."""

from dynaudit.engine.compare import compare_plan
from dynaudit.engine.measure import fit_report, measure_plan
from dynaudit.engine.plan import Job, Planned, Progress

__all__ = ["Job", "Planned", "Progress", "compare_plan", "fit_report", "measure_plan"]
