"""Fault injection: the payment flow under broker kills, PostgreSQL restarts and worker kills,
and the checker that accounts for every confirmed order (docs/guarantees.md)."""

from securebroker.faults.checker import (
    Observations,
    StageObservation,
    StageVerdict,
    Verdict,
    check,
)

__all__ = ["Observations", "StageObservation", "StageVerdict", "Verdict", "check"]
