"""The fault harness's accountant: did every confirmed business event take effect exactly once?

Pure: no I/O, no clock. The harness (or a test) gathers what each party says happened and the
checker compares them, one *stage* at a time (a stage is one kind of effect, such as "the
payment service wrote a ledger debit" or "the ledger consumer recorded the completion"):

- ``confirmed``: the business ids producers hold a confirmation for (an order whose transaction,
  with its outbox row, committed; or a publish the broker confirmed);
- per stage, ``effects``: one entry per effect row found in the consumer's own database,
  carrying the business id it was applied for (so an effect applied twice appears twice);
- per stage, ``redeliveries``: deliveries the consumer's inbox recognised as already processed
  and did not act on again (at-least-once delivery at work; allowed);
- per stage, ``held``: business ids still on their way to that stage (an unsent outbox row, an
  unsettled delivery in the broker): not lost, not yet done.

Verdict per stage, each id in exactly one bucket or none:

- ``lost``: confirmed, no effect, and nothing holds it any more (a broken promise);
- ``pending``: confirmed, no effect, still held (the run ended before it was consumed);
- ``duplicated``: more than one effect for one id (a broken promise, whatever the cause);
- ``unexpected``: an effect for an id nobody confirmed (a phantom, also broken);
- ``redelivered``: ids delivered again and recorded as redeliveries, with exactly one effect:
  the only form of duplicate the contract allows (docs/guarantees.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StageObservation:
    """What one consuming stage's own database and inbox say."""

    name: str
    #: one business id per effect row (repeated when the effect was applied more than once)
    effects: Sequence[str]
    #: one business id per delivery the inbox recorded as a redelivery (not acted on again)
    redeliveries: Sequence[str] = ()
    #: business ids still held upstream of this stage (broker, outbox): not yet due
    held: Collection[str] = ()


@dataclass(frozen=True)
class Observations:
    """Everything the checker compares: producers' confirmations and each stage's records."""

    confirmed: Collection[str]
    stages: Sequence[StageObservation]


@dataclass(frozen=True)
class StageVerdict:
    stage: str
    effects: int
    lost: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    #: business id -> number of effects (always > 1)
    duplicated: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    #: business id -> recorded redeliveries, for ids with exactly one effect (allowed)
    redelivered: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected)

    def to_dict(self, *, limit: int = 20) -> dict[str, Any]:
        """Counts, and at most ``limit`` example ids per bucket (a report, not a dump)."""
        return {
            "stage": self.stage,
            "effects": self.effects,
            "lost": len(self.lost),
            "pending": len(self.pending),
            "duplicated": len(self.duplicated),
            "unexpected": len(self.unexpected),
            "redelivered": sum(self.redelivered.values()),
            "examples": {
                "lost": self.lost[:limit],
                "pending": self.pending[:limit],
                "duplicated": dict(list(self.duplicated.items())[:limit]),
                "unexpected": self.unexpected[:limit],
            },
        }


@dataclass(frozen=True)
class Verdict:
    confirmed: int
    stages: list[StageVerdict]

    @property
    def lost(self) -> int:
        return sum(len(s.lost) for s in self.stages)

    @property
    def pending(self) -> int:
        return sum(len(s.pending) for s in self.stages)

    @property
    def duplicated(self) -> int:
        """Effects beyond the first, over all stages (two debits for one order count 1)."""
        return sum(n - 1 for s in self.stages for n in s.duplicated.values())

    @property
    def unexpected(self) -> int:
        return sum(len(s.unexpected) for s in self.stages)

    @property
    def redelivered(self) -> int:
        return sum(sum(s.redelivered.values()) for s in self.stages)

    @property
    def ok(self) -> bool:
        """Nothing lost, duplicated or unexpected (pending is reported apart: see ``settled``)."""
        return all(s.ok for s in self.stages)

    @property
    def settled(self) -> bool:
        """``ok`` and nothing still in flight: every confirmed id took effect at every stage."""
        return self.ok and self.pending == 0

    def stage(self, name: str) -> StageVerdict:
        for s in self.stages:
            if s.stage == name:
                return s
        raise KeyError(name)

    def to_dict(self, *, limit: int = 20) -> dict[str, Any]:
        return {
            "confirmed": self.confirmed,
            "lost": self.lost,
            "pending": self.pending,
            "duplicated": self.duplicated,
            "unexpected": self.unexpected,
            "redelivered": self.redelivered,
            "ok": self.ok,
            "stages": [s.to_dict(limit=limit) for s in self.stages],
        }


def check_stage(confirmed: Collection[str], stage: StageObservation) -> StageVerdict:
    confirmed_set = frozenset(confirmed)
    held = frozenset(stage.held)
    counts = Counter(stage.effects)
    lost: list[str] = []
    pending: list[str] = []
    for business_id in sorted(confirmed_set):
        if counts[business_id] == 0:
            (pending if business_id in held else lost).append(business_id)
    duplicated = {b: n for b, n in sorted(counts.items()) if n > 1}
    unexpected = [b for b in sorted(counts) if b not in confirmed_set]
    redeliveries = Counter(stage.redeliveries)
    redelivered = {b: n for b, n in sorted(redeliveries.items()) if counts[b] == 1}
    return StageVerdict(
        stage=stage.name,
        effects=sum(counts.values()),
        lost=lost,
        pending=pending,
        duplicated=duplicated,
        unexpected=unexpected,
        redelivered=redelivered,
    )


def check(observations: Observations) -> Verdict:
    """Compare every stage with the producers' confirmations."""
    confirmed = frozenset(observations.confirmed)
    return Verdict(
        confirmed=len(confirmed),
        stages=[check_stage(confirmed, s) for s in observations.stages],
    )
