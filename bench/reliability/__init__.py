"""The reliability and security suite (``python -m bench.reliability``; docs/reliability.md)."""

from __future__ import annotations

from bench.reliability import alarms, damage, inputs, round2, secrets
from bench.reliability.core import Case

__all__ = ["CASES", "TABLES"]

TABLES = ("alarms", "damage", "inputs", "secrets", "round2")
CASES: list[Case] = [*alarms.CASES, *damage.CASES, *inputs.CASES, *secrets.CASES, *round2.CASES]
