"""The fault checker's accounting (securebroker/faults/checker.py): it must catch what it is for.

A checker that always says "fine" would make every fault run pass, so each kind of broken
promise is injected here on purpose, next to a clean run that must pass.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from securebroker.faults.checker import Observations, StageObservation, check

ORDERS = [f"o-{i}" for i in range(10)]


def clean(**stage_changes: Any) -> Observations:
    """Ten confirmed orders, each debited once and completed once; a few allowed redeliveries."""
    debit = StageObservation(
        "payment.ledger_debit", effects=list(ORDERS), redeliveries=["o-3", "o-3", "o-7"]
    )
    completion = StageObservation("ledger.completion", effects=list(ORDERS), redeliveries=["o-1"])
    debit = dataclasses.replace(debit, **stage_changes)
    return Observations(confirmed=ORDERS, stages=[debit, completion])


def test_a_clean_run_passes_and_counts_redeliveries_as_allowed() -> None:
    verdict = check(clean())
    assert verdict.ok and verdict.settled
    assert (verdict.lost, verdict.duplicated, verdict.unexpected, verdict.pending) == (0, 0, 0, 0)
    assert verdict.confirmed == 10
    assert verdict.redelivered == 4
    assert verdict.stage("payment.ledger_debit").redelivered == {"o-3": 2, "o-7": 1}
    assert verdict.stage("ledger.completion").effects == 10


def test_an_injected_loss_is_caught() -> None:
    effects = [o for o in ORDERS if o != "o-4"]
    verdict = check(clean(effects=effects))
    assert not verdict.ok
    assert verdict.lost == 1
    assert verdict.stage("payment.ledger_debit").lost == ["o-4"]
    assert verdict.stage("ledger.completion").lost == []


def test_an_injected_double_effect_is_caught() -> None:
    verdict = check(clean(effects=[*ORDERS, "o-5"]))
    assert not verdict.ok
    assert verdict.duplicated == 1
    assert verdict.stage("payment.ledger_debit").duplicated == {"o-5": 2}


def test_a_double_effect_is_not_excused_by_a_recorded_redelivery() -> None:
    # o-3 was redelivered (recorded) AND debited twice: the redelivery does not make it allowed
    verdict = check(clean(effects=[*ORDERS, "o-3"]))
    assert verdict.duplicated == 1
    assert "o-3" not in verdict.stage("payment.ledger_debit").redelivered


def test_a_triple_effect_counts_two_extra() -> None:
    verdict = check(clean(effects=[*ORDERS, "o-2", "o-2"]))
    assert verdict.duplicated == 2
    assert verdict.stage("payment.ledger_debit").duplicated == {"o-2": 3}


def test_an_effect_for_an_unconfirmed_order_is_unexpected() -> None:
    # e.g. an order whose transaction rolled back, yet its message was sent and acted on
    verdict = check(clean(effects=[*ORDERS, "o-rolled-back"]))
    assert not verdict.ok
    assert verdict.unexpected == 1
    assert verdict.stage("payment.ledger_debit").unexpected == ["o-rolled-back"]


def test_a_missing_effect_still_held_upstream_is_pending_not_lost() -> None:
    effects = [o for o in ORDERS if o != "o-9"]
    verdict = check(clean(effects=effects, held={"o-9"}))
    assert verdict.ok  # nothing broken...
    assert not verdict.settled  # ...but not finished either
    assert (verdict.lost, verdict.pending) == (0, 1)
    assert verdict.stage("payment.ledger_debit").pending == ["o-9"]


@pytest.mark.parametrize("stage", [0, 1])
def test_every_stage_is_checked(stage: int) -> None:
    obs = clean()
    stages = list(obs.stages)
    broken = stages[stage]
    stages[stage] = StageObservation(broken.name, effects=list(broken.effects)[1:])
    verdict = check(Observations(obs.confirmed, stages))
    assert verdict.lost == 1
    assert verdict.stages[stage].lost == [ORDERS[0]]


def test_the_report_is_json_and_bounded() -> None:
    many = [f"x-{i}" for i in range(100)]
    verdict = check(Observations(confirmed=many, stages=[StageObservation("s", effects=[])]))
    report = json.loads(json.dumps(verdict.to_dict(limit=5)))
    assert report["lost"] == 100
    assert report["stages"][0]["lost"] == 100
    assert len(report["stages"][0]["examples"]["lost"]) == 5
