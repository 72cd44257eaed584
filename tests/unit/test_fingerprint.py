"""Idempotency fingerprints are stored for the retention period, so their encoding must never
change: a retry published across a broker upgrade must still be recognised as the same message.
Known answers, computed with the original field-by-field encoding."""

from __future__ import annotations

from securebroker.core.broker import fingerprint, fingerprint_mac
from securebroker.core.model import PublishRequest

KEY = b"test-fingerprint-key-0123456789ab"


def test_fingerprints_keep_their_known_values() -> None:
    base = fingerprint_mac(KEY)
    full = PublishRequest(
        "t",
        b'{"order": 42}',
        attributes={"b": "2", "a": "é"},
        content_type="application/json",
        ordering_key="acct-1",
    )
    bare = PublishRequest("t", b"")
    assert fingerprint(base, full).hex() == (
        "d09252207160fc6efd0433731b2be5e469f93cc93b7fdf08a2b5fa93010f1ede"
    )
    assert fingerprint(base, bare).hex() == (
        "88d6b6cb6e375bdf01f4dd4b0ffe4c824562d35160923271c605cdb2e99732e8"
    )
    # the base is copied, never consumed: the same request gives the same digest again
    assert fingerprint(base, full) == fingerprint(base, full)


def test_every_field_that_makes_a_message_changes_the_fingerprint() -> None:
    base = fingerprint_mac(KEY)
    req = PublishRequest("t", b"p", attributes={"a": "1"}, ordering_key="o")
    variants = [
        PublishRequest("t", b"q", attributes={"a": "1"}, ordering_key="o"),
        PublishRequest("t", b"p", attributes={"a": "2"}, ordering_key="o"),
        PublishRequest("t", b"p", attributes={"a": "1"}, ordering_key="x"),
        PublishRequest("t", b"p", attributes={"a": "1"}, ordering_key="o", content_type="x/y"),
        # length prefixes: moving bytes between fields is a different message
        PublishRequest("t", b"p", attributes={"a\x001": ""}, ordering_key="o"),
    ]
    assert len({fingerprint(base, v) for v in [req, *variants]}) == 1 + len(variants)
