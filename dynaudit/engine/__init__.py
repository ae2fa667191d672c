"""The engine: a planned checkpoint measured (:mod:`.measure`) or compared with its baseline
(:mod:`.compare`) layer by layer, streaming the tensors and sharding the layers over a torchrun
job; :mod:`.plan` says which layers are fitted and with which settings."""

from dynaudit.engine.compare import compare_plan
from dynaudit.engine.measure import fit_report, measure_plan
from dynaudit.engine.plan import Job, Planned, Progress

__all__ = ["Job", "Planned", "Progress", "compare_plan", "fit_report", "measure_plan"]
