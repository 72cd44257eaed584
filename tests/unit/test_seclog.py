"""Security log lines: specific reasons, repeats summarised instead of flooding."""

from __future__ import annotations

import logging

import pytest

from securebroker.server.seclog import SecurityLog


def test_repeats_within_the_window_are_counted_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    sec = SecurityLog(window=10, monotonic=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="securebroker.security"):
        for _ in range(100):
            sec.denied("10.0.0.1:5000", "intruder", "no rule grants publish on topic 'x'")
        sec.denied("10.0.0.1:5000", "other", "no rule grants publish on topic 'x'")
        sec.refused("10.0.0.2:6000", "authentication failed: unknown kid 'k9'")
        now[0] = 10.5
        sec.denied("10.0.0.1:5001", "intruder", "no rule grants publish on topic 'x'")
    assert [r.getMessage() for r in caplog.records] == [
        "denied intruder (10.0.0.1:5000): no rule grants publish on topic 'x'",
        "denied other (10.0.0.1:5000): no rule grants publish on topic 'x'",
        "refused 10.0.0.2:6000: authentication failed: unknown kid 'k9'",
        "denied intruder (10.0.0.1:5001): no rule grants publish on topic 'x'"
        " (and 99 more like it)",
    ]


def test_memory_is_bounded() -> None:
    sec = SecurityLog(max_keys=3)
    for i in range(10):
        sec.refused(f"peer-{i}", "tls handshake failed")
    assert len(sec._seen) <= 3
