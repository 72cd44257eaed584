import os
from datetime import UTC, datetime, timedelta

from securebroker.ids import uuid7


def test_uuid7_layout_and_order() -> None:
    t = datetime(2026, 11, 25, tzinfo=UTC)
    a = uuid7(t, b"\x00" * 10)
    assert a.version == 7 and a.variant == "specified in RFC 4122"
    assert a.int >> 80 == int(t.timestamp() * 1000)
    ids = [uuid7(t + timedelta(milliseconds=i)) for i in range(10_000)]
    assert ids == sorted(ids)  # time-ordered across milliseconds
    assert len(set(ids)) == len(ids)  # and unique, across refills of the random buffer


def test_forked_child_does_not_reuse_parent_randomness() -> None:
    t = datetime(2026, 11, 25, tzinfo=UTC)
    uuid7(t)  # fill the parent's buffer
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its next id
        os.write(w, uuid7(t).bytes)
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(r, 16)
    os.close(r)
    os.close(w)
    assert child != uuid7(t).bytes
