"""The offline audit verifier: every tamper is reported with its kind and first bad sequence."""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from securebroker.audit.bundle import Bundle, BundleError, BundleHeader, BundleWriter, read_bundle
from securebroker.audit.checkpoint import AuditError, Checkpoint, Head, SigningKey
from securebroker.audit.cli import audit
from securebroker.audit.record import (
    Actor,
    AuditEvent,
    AuditRecord,
    Event,
    genesis,
    seal,
)
from securebroker.audit.verify import Problem, Report, verify_bundle

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
WRITER = Actor(
    certificate="spiffe://acme/orders",
    subject="svc-orders",
    address="10.0.0.5:50122",
    protocol="native",
)
KEY = SigningKey.generate()
OTHER_KEY = SigningKey.generate()


# -- building trails --------------------------------------------------------------------------


def event_of(r: AuditRecord, **changes: object) -> AuditEvent:
    ev = AuditEvent(
        at=r.at,
        event=r.event,
        outcome=r.outcome,
        actor=Actor(r.actor_cert, r.actor_sub, r.origin_addr, r.origin_proto),
        topic=r.topic,
        subscription=r.subscription,
        message_id=r.message_id,
        key_id=r.key_id,
        trace_id=r.trace_id,
        detail=dict(r.detail),
    )
    return ev._replace(**changes)


def build_chain(chain: int, length: int, *, start: int = 1, offset_s: int = 0) -> list[AuditRecord]:
    out: list[AuditRecord] = []
    prev = genesis(chain)
    for seq in range(start, start + length):
        ev = AuditEvent(
            at=T0 + timedelta(seconds=offset_s + 10 * seq),
            event=Event.PUBLISHED,
            actor=WRITER,
            topic=f"orders.{chain}",
            message_id=f"00000000-0000-0000-0000-{chain:06d}{seq:06d}",
            detail={"bytes": 100 + seq, "encrypted": True},
        )
        r = seal(chain, seq, prev, ev)
        out.append(r)
        prev = r.hash
    return out


def reseal(records: Sequence[AuditRecord], from_seq: int, **changes: object) -> list[AuditRecord]:
    """A forgery made without the signing key: change record ``from_seq`` and re-hash it and every
    later record so that all links are valid again."""
    out: list[AuditRecord] = []
    prev: bytes | None = None
    for r in sorted(records, key=lambda r: r.seq):
        if r.seq < from_seq:
            out.append(r)
            continue
        if prev is None:
            prev = r.prev_hash
        ev = event_of(r, **changes) if r.seq == from_seq else event_of(r)
        forged = seal(r.chain, r.seq, prev, ev)
        out.append(forged)
        prev = forged.hash
    return out


@dataclass
class Instance:
    """A broker process signing checkpoints of the chains it writes."""

    name: str
    key: SigningKey = KEY
    n: int = 0
    prev: bytes | None = None
    signed: list[Checkpoint] = field(default_factory=list)

    def sign(self, heads: Iterable[AuditRecord], *, final: bool = False) -> Checkpoint:
        heads = list(heads)
        self.n += 1
        cp = self.key.sign_checkpoint(
            instance=self.name,
            n=self.n,
            prev=self.prev,
            at_us=max(r.at_us for r in heads) + 1,
            final=final,
            heads=[Head(r.chain, r.seq, r.hash, r.at_us) for r in heads],
        )
        self.prev = cp.digest()
        self.signed.append(cp)
        return cp


def standard_trail() -> tuple[list[AuditRecord], list[Checkpoint]]:
    """Chain 1 with 20 records, checkpoints at seq 5, 10, 15 and a final one at 20."""
    records = build_chain(1, 20)
    inst = Instance("broker-a")
    for seq in (5, 10, 15):
        inst.sign([records[seq - 1]])
    inst.sign([records[19]], final=True)
    return records, inst.signed


def write_bundle(
    path: Path,
    records: Iterable[AuditRecord],
    checkpoints: Iterable[Checkpoint] = (),
    *,
    keys: Sequence[bytes] = (KEY.public_bytes(),),
    since: datetime | None = None,
    until: datetime | None = None,
) -> Path:
    with BundleWriter(path, since, until, keys, "test/securebroker", overwrite=True) as w:
        for r in records:
            w.record(r)
        for cp in checkpoints:
            w.checkpoint(cp)
    return path


def check(
    tmp_path: Path,
    records: Iterable[AuditRecord],
    checkpoints: Iterable[Checkpoint] = (),
    *,
    trusted: Sequence[bytes] | None = (KEY.public_bytes(),),
    keys: Sequence[bytes] = (KEY.public_bytes(),),
    since: datetime | None = None,
    until: datetime | None = None,
) -> Report:
    path = write_bundle(
        tmp_path / "bundle.jsonl", records, checkpoints, keys=keys, since=since, until=until
    )
    return verify_bundle(read_bundle(path), trusted)


def first(report: Report) -> Problem:
    assert report.first_problem is not None, report.format_text()
    return report.first_problem


def kinds(report: Report) -> list[tuple[int | None, int | None, str]]:
    return [(p.chain, p.seq, p.kind) for p in report.problems]


def without(records: Sequence[AuditRecord], *seqs: int) -> list[AuditRecord]:
    return [r for r in records if r.seq not in seqs]


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(audit, list(args))
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    return result.exit_code, result.stdout, result.stderr


# -- an untouched bundle ----------------------------------------------------------------------


def test_untouched_bundle_verifies(tmp_path: Path) -> None:
    records, cps = standard_trail()
    report = check(tmp_path, records, cps)
    assert report.ok, report.format_text()
    assert report.problems == [] and report.first_problem is None
    assert (report.records, report.chains, report.checkpoints) == (20, 1, 4)
    assert report.checkpoints_verified == 4
    assert report.signing_key_ids == [KEY.key_id] and report.pinned
    assert report.warnings == []
    assert "result: OK" in report.format_text()
    doc = report.to_json()
    assert doc["ok"] is True and doc["first_problem"] is None
    json.dumps(doc)  # serialisable


def test_record_order_inside_the_bundle_does_not_matter(tmp_path: Path) -> None:
    records, cps = standard_trail()
    shuffled = records[10:] + records[:10][::-1]
    path = tmp_path / "b.jsonl"
    with BundleWriter(path, None, None, [KEY.public_bytes()], "test") as w:
        w.checkpoint(cps[3])
        for r in shuffled[:7]:
            w.record(r)
        w.checkpoint(cps[1])
        for r in shuffled[7:]:
            w.record(r)
        w.checkpoint(cps[0])
        w.checkpoint(cps[2])
    report = verify_bundle(read_bundle(path), [KEY.public_bytes()])
    assert report.ok, report.format_text()


def test_unpinned_keys_are_named_in_a_warning(tmp_path: Path) -> None:
    records, cps = standard_trail()
    report = check(tmp_path, records, cps, trusted=None)
    assert report.ok
    assert not report.pinned
    assert any("not pinned" in w and KEY.key_id in w for w in report.warnings)
    assert "NOT pinned" in report.format_text()


def test_cli_verify_untouched_bundle(tmp_path: Path) -> None:
    records, cps = standard_trail()
    path = write_bundle(tmp_path / "b.jsonl", records, cps)
    code, out, _ = cli("verify", str(path))
    assert code == 0, out
    assert "result: OK" in out and KEY.key_id in out and "NOT pinned" in out
    # pinned by hex, by a PEM file and by a hex file
    pem = tmp_path / "audit.pub.pem"
    pem.write_bytes(KEY.public_pem())
    hexfile = tmp_path / "audit.pub.hex"
    hexfile.write_text(KEY.public_bytes().hex() + "\n")
    for pin in (KEY.public_bytes().hex(), str(pem), str(hexfile)):
        code, out, _ = cli("verify", str(path), "--public-key", pin)
        assert code == 0, out
        assert "(pinned)" in out
    code, out, _ = cli("verify", str(path), "--json", "--public-key", str(pem))
    assert code == 0
    doc = json.loads(out)
    assert doc["ok"] is True and doc["records"] == 20 and doc["pinned"] is True


# -- records ----------------------------------------------------------------------------------


def test_edited_middle_record_is_altered(tmp_path: Path) -> None:
    records, cps = standard_trail()
    records[6] = dataclasses.replace(records[6], topic="payments")  # seq 7
    report = check(tmp_path, records, cps)
    assert kinds(report) == [(1, 7, "altered")]
    assert "changed" in first(report).message


def batch_trail() -> tuple[list[AuditRecord], list[Checkpoint]]:
    """Chain 1 of 6 records, every other one a batch record (ADR 0013), signed at the end."""
    out: list[AuditRecord] = []
    prev = genesis(1)
    for seq in range(1, 7):
        ids = [f"00000000-0000-0000-0001-{seq:06d}{j:06d}" for j in range(seq)]
        ev = AuditEvent(
            at=T0 + timedelta(seconds=seq),
            event=Event.DELIVERED,
            actor=WRITER,
            topic="orders",
            subscription="ledger",
            detail={"attempt": 1},
            **(
                {"message_ids": ids, "trace_ids": ["ab" * 16] + [None] * (seq - 1)}
                if seq % 2
                else {"message_id": ids[0]}
            ),
        )
        out.append(seal(1, seq, prev, ev))
        prev = out[-1].hash
    inst = Instance("broker-a")
    inst.sign([out[-1]], final=True)
    return out, inst.signed


def test_batch_records_verify_and_round_trip(tmp_path: Path) -> None:
    records, cps = batch_trail()
    report = check(tmp_path, records, cps)
    assert report.ok, report.format_text()
    assert report.records == 6
    back = [r for r in read_bundle(write_bundle(tmp_path / "b", records, cps)).records]
    assert sorted(back, key=lambda r: r.seq) == records
    # a record of one message exports exactly as before batches existed
    assert "message_ids" not in records[1].to_json()
    assert records[4].messages() == records[4].message_ids and len(records[4].messages()) == 5
    assert records[4].trace_of(records[4].messages()[0]) == "ab" * 16
    assert records[4].trace_of(records[4].messages()[1]) is None
    assert records[1].messages() == (records[1].message_id,)


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: dataclasses.replace(
            r, message_ids=r.message_ids[:-1], trace_ids=r.trace_ids[:-1]
        ),
        lambda r: dataclasses.replace(r, message_ids=r.message_ids[::-1]),
        lambda r: dataclasses.replace(
            r, message_ids=(*r.message_ids[:-1], "00000000-0000-0000-0000-00000000dead")
        ),
        lambda r: dataclasses.replace(r, trace_ids=(None,) * len(r.trace_ids)),
        # a batch turned into a record of its first message alone
        lambda r: dataclasses.replace(
            r, message_id=r.message_ids[0], message_ids=None, trace_ids=None
        ),
    ],
    ids=["message-removed", "reordered", "message-replaced", "trace-erased", "unbatched"],
)
def test_any_edit_of_a_batch_record_is_altered(tmp_path: Path, edit: Any) -> None:
    records, cps = batch_trail()
    records[4] = edit(records[4])  # seq 5: a batch of five
    report = check(tmp_path, records, cps)
    assert kinds(report) == [(1, 5, "altered")]


def test_bundles_of_format_1_still_verify(tmp_path: Path) -> None:
    """Exports made before batch records (bundle format 1) read and verify as before; new
    exports say format 2, so a verifier that predates batch records refuses them outright
    instead of reporting every batch record as altered."""
    records, cps = standard_trail()
    path = write_bundle(tmp_path / "b.jsonl", records, cps)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["format"] == 2
    lines[0] = json.dumps(header | {"format": 1})
    path.write_text("\n".join(lines) + "\n")
    report = verify_bundle(read_bundle(path), [KEY.public_bytes()])
    assert report.ok and report.records == 20, report.format_text()


def test_a_batch_record_whose_trace_ids_do_not_align_is_malformed(tmp_path: Path) -> None:
    records, cps = batch_trail()
    path = write_bundle(tmp_path / "b.jsonl", records, cps)
    lines = path.read_text().splitlines()
    i = next(n for n, line in enumerate(lines) if '"seq":5' in line.replace(" ", ""))
    rec = json.loads(lines[i])
    rec["trace_ids"] = rec["trace_ids"][:-1]
    lines[i] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    report = verify_bundle(read_bundle(path), [KEY.public_bytes()])
    mal = [p for p in report.problems if p.kind == "malformed"]
    assert len(mal) == 1 and "trace_ids" in mal[0].message
    assert (1, 5, "missing") in kinds(report)  # and its place in the chain is a gap


def test_edited_and_rehashed_record_breaks_the_next_link(tmp_path: Path) -> None:
    records, cps = standard_trail()
    r = records[6]
    records[6] = seal(1, 7, r.prev_hash, event_of(r, topic="payments"))
    report = check(tmp_path, records, cps)
    assert kinds(report) == [(1, 8, "broken_link")]
    assert "record 7 was rewritten" in first(report).message


def test_deleted_middle_record_is_missing(tmp_path: Path) -> None:
    records, cps = standard_trail()
    report = check(tmp_path, without(records, 9), cps)
    assert kinds(report) == [(1, 9, "missing")]
    assert "record 9 is missing" in first(report).message
    report = check(tmp_path, without(records, 9, 10, 11), cps)
    assert kinds(report) == [(1, 9, "missing")]
    assert "records 9..11 are missing" in first(report).message


def test_reordered_records_are_altered_at_the_first(tmp_path: Path) -> None:
    records, cps = standard_trail()
    r4, r6 = records[3], records[5]
    records[3] = dataclasses.replace(r6, seq=4)
    records[5] = dataclasses.replace(r4, seq=6)
    report = check(tmp_path, records, cps)
    assert first(report).kind == "altered" and first(report).seq == 4
    assert (1, 6, "altered") in kinds(report)


def test_cli_reports_tampering_with_exit_1(tmp_path: Path) -> None:
    records, cps = standard_trail()
    path = write_bundle(tmp_path / "b.jsonl", without(records, 12), cps)
    code, out, _ = cli("verify", str(path), "--public-key", KEY.public_bytes().hex())
    assert code == 1
    assert "FAILED" in out and "chain 1 seq 12: missing" in out
    code, out, _ = cli("verify", str(path), "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["ok"] is False
    assert (doc["first_problem"]["chain"], doc["first_problem"]["seq"]) == (1, 12)


def test_duplicates(tmp_path: Path) -> None:
    records, cps = standard_trail()
    forged = seal(1, 8, records[6].hash, event_of(records[7], topic="x"))
    report = check(tmp_path, [*records, forged], cps)
    assert kinds(report) == [(1, 8, "duplicate")]
    report = check(tmp_path, [*records, records[7]], cps)  # an identical copy: a warning only
    assert report.ok
    assert any("identical" in w for w in report.warnings)


def test_replaced_chain_start_is_a_broken_link_at_seq_1(tmp_path: Path) -> None:
    records = build_chain(1, 5)
    fake = seal(1, 1, b"\x00" * 32, event_of(records[0]))
    report = check(tmp_path, [fake, *records[1:]], trusted=None)
    assert kinds(report)[0] == (1, 1, "broken_link")


# -- checkpoints against records --------------------------------------------------------------


def test_deleted_newest_records_are_truncated(tmp_path: Path) -> None:
    records, cps = standard_trail()
    report = check(tmp_path, records[:16], cps)  # 17..20 gone; the final checkpoint says 20
    assert kinds(report) == [(1, 17, "truncated")]
    msg = first(report).message
    assert "records 17..20" in msg and "broker-a#4" in msg and "seq 20" in msg
    assert (first(report).instance, first(report).n) == ("broker-a", 4)


def test_deleting_records_no_checkpoint_covers_is_only_a_warning(tmp_path: Path) -> None:
    records, cps = standard_trail()
    report = check(tmp_path, records[:18], cps[:3])  # the final checkpoint is gone too
    assert report.ok
    assert "3 record(s) of chain 1 after seq 15 are not yet covered" in report.warnings[0]


def test_suffix_forgery_is_caught_by_checkpoints(tmp_path: Path) -> None:
    records, cps = standard_trail()
    forged = reseal(records, 12, topic="payments")
    report = check(tmp_path, forged, cps)
    assert kinds(report) == [(1, 11, "checkpoint_mismatch")]
    msg = first(report).message
    assert "broker-a#2" in msg and "seq 10" in msg and "broker-a#3" in msg
    assert "1 later signed head(s) also disagree" in msg


def test_wholesale_forgery_is_caught_at_seq_1(tmp_path: Path) -> None:
    records, cps = standard_trail()
    forged = reseal(records, 1, topic="payments")
    report = check(tmp_path, forged, cps)
    assert kinds(report) == [(1, 1, "checkpoint_mismatch")]
    assert "no earlier checkpoint matches" in first(report).message


def test_forgery_with_checkpoints_resigned_by_another_key(tmp_path: Path) -> None:
    records, _ = standard_trail()
    forged = reseal(records, 1, topic="payments")
    mallory = Instance("broker-a", key=OTHER_KEY)
    cps = [mallory.sign([forged[s - 1]]) for s in (5, 10, 15, 20)]
    keys = (KEY.public_bytes(), OTHER_KEY.public_bytes())
    # the auditor pinned the broker's key: every forged checkpoint is untrusted
    report = check(tmp_path, forged, cps, keys=keys)
    assert {p.kind for p in report.problems} == {"untrusted_key"}
    assert len(report.problems) == 4 and report.checkpoints_verified == 0
    assert OTHER_KEY.key_id in first(report).message
    # without pinning it passes, but the report names the key for the auditor to compare
    report = check(tmp_path, forged, cps, keys=keys, trusted=None)
    assert report.ok
    assert any(OTHER_KEY.key_id in w and "not pinned" in w for w in report.warnings)
    # a key that is not even in the header: the signatures cannot be checked
    report = check(tmp_path, forged, cps, trusted=None)
    assert {p.kind for p in report.problems} == {"bad_signature"}


def test_altered_checkpoint_has_a_bad_signature(tmp_path: Path) -> None:
    records, cps = standard_trail()
    forged = reseal(records, 18, topic="payments")
    body = cps[3].body.replace(records[19].hash.hex().encode(), forged[19].hash.hex().encode())
    cps[3] = Checkpoint.parse(body, cps[3].signature, cps[3].key_id)
    report = check(tmp_path, forged, cps)
    assert ("bad_signature", "broker-a", 4) in [(p.kind, p.instance, p.n) for p in report.problems]
    # with #4 not counting, the forged tail is only uncovered records (a warning)
    assert {p.kind for p in report.problems} == {"bad_signature"}


def test_deleted_middle_checkpoint(tmp_path: Path) -> None:
    records, cps = standard_trail()
    report = check(tmp_path, records, [cps[0], cps[2], cps[3]])
    assert [(p.kind, p.instance, p.n) for p in report.problems] == [
        ("checkpoint_missing", "broker-a", 2)
    ]
    assert "#2" in first(report).message


def test_checkpoint_link(tmp_path: Path) -> None:
    records = build_chain(1, 10)
    inst = Instance("broker-a")
    inst.sign([records[4]])
    inst.prev = b"\x11" * 32  # signed by the real key, but naming the wrong predecessor
    inst.sign([records[9]])
    report = check(tmp_path, records, inst.signed)
    assert [(p.kind, p.n) for p in report.problems] == [("checkpoint_link", 2)]


def test_conflicting_checkpoints(tmp_path: Path) -> None:
    records = build_chain(1, 10)
    a = Instance("broker-a")
    a.sign([records[4]])
    b = Instance("broker-a")
    b.sign([records[5]])
    report = check(tmp_path, records, [*a.signed, *b.signed])
    assert [p.kind for p in report.problems] == ["checkpoint_conflict"]


def test_chain_missing_from_the_window_is_truncated(tmp_path: Path) -> None:
    one, two = build_chain(1, 5), build_chain(2, 5, offset_s=100)
    inst = Instance("broker-a")
    inst.sign([one[4], two[4]], final=True)
    report = check(tmp_path, one, inst.signed)
    assert kinds(report) == [(2, 1, "truncated")]
    assert "chain 2 has no records" in first(report).message
    # a window that ends before chain 2's head was written: nothing is expected of chain 2
    until = one[4].at + timedelta(microseconds=1)
    assert two[4].at > until
    report = check(tmp_path, one, inst.signed, until=until)
    assert report.ok, report.format_text()


def test_export_starting_mid_chain(tmp_path: Path) -> None:
    records, cps = standard_trail()
    since = records[10].at  # seq 11 on
    report = check(tmp_path, records[10:], cps, since=since)
    assert report.ok, report.format_text()  # anchored: checkpoint #2 signed seq 10
    report = check(tmp_path, records[11:], cps[2:], since=records[11].at)
    assert report.ok
    assert any("starts at seq 12" in w and "anchor" in w for w in report.warnings)
    # a head inside the window that the bundle does not hold: the start was cut off
    report = check(tmp_path, records[16:], cps, since=records[12].at)
    # seq 15 was signed inside the window; 11.. may be (10 was signed before it)
    assert kinds(report) == [(1, 11, "truncated")]
    assert "certainly from seq 15" in first(report).message
    # without 'since' a bundle claims the whole trail: a chain must start at seq 1
    report = check(tmp_path, records[3:], cps)
    assert kinds(report) == [(1, 1, "missing")]
    assert "records 1..3 are missing" in first(report).message


def test_two_instances_and_several_chains(tmp_path: Path) -> None:
    a1, a2 = build_chain(1, 12), build_chain(2, 8, offset_s=1)
    b3 = build_chain(3, 10, offset_s=2)
    a, b = Instance("host-a:1:aaaa"), Instance("host-b:7:bbbb")
    a.sign([a1[3], a2[3]])
    b.sign([b3[4]])
    a.sign([a1[7], a2[7]])
    b.sign([b3[7]])
    a.sign([a1[11], a2[7]], final=True)
    b.sign([b3[9]], final=True)
    records = [*a1, *b3, *a2]
    cps = [*b.signed, *a.signed]
    report = check(tmp_path, records, cps)
    assert report.ok, report.format_text()
    assert (report.chains, report.checkpoints_verified) == (3, 6)

    # tampering in one chain is reported in that chain only
    tampered = [*a1, *reseal(b3, 6, topic="x"), *a2]
    report = check(tmp_path, tampered, cps)
    assert kinds(report) == [(3, 6, "checkpoint_mismatch")]

    # deleting one of b's checkpoints is reported for b
    report = check(tmp_path, records, [*a.signed, b.signed[0], b.signed[2]])
    assert [(p.kind, p.instance, p.n) for p in report.problems] == [
        ("checkpoint_missing", "host-b:7:bbbb", 2)
    ]

    # problems are sorted by chain then seq
    messy = [*without(a1, 3), *without(b3, 2), *a2]
    messy[0] = dataclasses.replace(messy[0], topic="edited")
    report = check(tmp_path, messy, cps)
    assert kinds(report) == [(1, 1, "altered"), (1, 3, "missing"), (3, 2, "missing")]


# -- the bundle file --------------------------------------------------------------------------


def test_malformed_lines_are_reported_not_fatal(tmp_path: Path) -> None:
    records, cps = standard_trail()
    path = write_bundle(tmp_path / "b.jsonl", records, cps)
    lines = path.read_text().splitlines()
    bad_cp = json.loads(lines[-1])
    bad_cp["body"] = bad_cp["body"].replace('"format":1', '"format":9')
    lines[3:3] = [
        "{not json",
        json.dumps({"type": "record", "chain": 1}),
        json.dumps({"type": "gossip"}),
        json.dumps(bad_cp),
    ]
    path.write_text("\n".join(lines) + "\n")
    report = verify_bundle(read_bundle(path), [KEY.public_bytes()])
    mal = [p for p in report.problems if p.kind == "malformed"]
    assert [p.line for p in mal] == [4, 5, 6, 7]
    assert all(p.chain is None and p.seq is None for p in mal)
    assert "line 5" in mal[1].message and "missing field" in mal[1].message
    assert "unsupported format" in mal[3].message
    assert {p.kind for p in report.problems} == {"malformed"}  # the real lines still verify
    code, out, _ = cli("verify", str(path))
    assert code == 1 and "malformed: line 4:" in out


def test_unreadable_bundles_exit_2(tmp_path: Path) -> None:
    no_header = tmp_path / "no-header.jsonl"
    no_header.write_text(json.dumps({"type": "record"}) + "\n")
    future = tmp_path / "future.jsonl"
    future.write_text(
        json.dumps({"type": "header", "format": 3, "created_at": T0.isoformat()}) + "\n"
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    corrupt_gz = tmp_path / "corrupt.jsonl.gz"
    corrupt_gz.write_bytes(b"\x1f\x8bthis is not gzip")
    for path, expected in (
        (no_header, "not a bundle header"),
        (future, "unsupported bundle format 3"),
        (empty, "empty"),
        (corrupt_gz, "cannot read"),
        (tmp_path / "absent.jsonl", "cannot open"),
    ):
        with pytest.raises(BundleError, match=expected):
            read_bundle(path)
        code, out, err = cli("verify", str(path))
        assert code == 2, (path, out, err)
        assert out == ""
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err
        assert "Traceback" not in err


def test_bad_public_key_argument_exits_2(tmp_path: Path) -> None:
    records, cps = standard_trail()
    path = write_bundle(tmp_path / "b.jsonl", records, cps)
    private = tmp_path / "signing.pem"
    SigningKey.create(private)
    junk = tmp_path / "junk.txt"
    junk.write_text("hello")
    for value, expected in (
        ("abcd", "neither"),
        (str(private), "private key"),
        (str(junk), "neither a PEM public key nor"),
    ):
        code, out, err = cli("verify", str(path), "--public-key", value)
        assert code == 2 and out == ""
        assert err.startswith("error: --public-key") and expected in err


def test_gzip_round_trip(tmp_path: Path) -> None:
    records, cps = standard_trail()
    path = write_bundle(tmp_path / "audit.jsonl.gz", records, cps)
    raw = path.read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    assert gzip.decompress(raw).decode().startswith('{"type":"header"')
    bundle = read_bundle(path)
    assert bundle.records == records
    assert [c.body for c in bundle.checkpoints] == [c.body for c in cps]
    assert bundle.checkpoints == cps
    assert verify_bundle(bundle, [KEY.public_bytes()]).ok
    code, _, _ = cli("verify", str(path))
    assert code == 0
    # a gzip stream cut short: what was read is verified, the cut is a malformed problem
    path.write_bytes(raw[: len(raw) // 2])
    report = verify_bundle(read_bundle(path), [KEY.public_bytes()])
    assert "malformed" in {p.kind for p in report.problems}


def test_bundle_header_round_trip(tmp_path: Path) -> None:
    since, until = T0, T0 + timedelta(days=1)
    path = write_bundle(
        tmp_path / "b.jsonl", [], keys=[KEY.public_bytes(), OTHER_KEY.public_bytes()],
        since=since, until=until,
    )  # fmt: skip
    header = read_bundle(path).header
    assert (header.since, header.until, header.source) == (since, until, "test/securebroker")
    assert header.public_keys == (KEY.public_bytes(), OTHER_KEY.public_bytes())
    first_line = json.loads(path.read_text().splitlines()[0])
    assert first_line["public_keys"][0] == {
        "key_id": KEY.key_id,
        "public_key": KEY.public_bytes().hex(),
    }


def test_writer_is_atomic_private_and_does_not_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "out" / "b.jsonl"
    records = build_chain(1, 3)
    with BundleWriter(path, None, None, [KEY.public_bytes()], "s") as w:
        w.record(records[0])
        assert not path.exists()  # streamed to a temporary file
    assert path.stat().st_mode & 0o777 == 0o600
    assert (w.records, w.checkpoints) == (1, 0)
    with pytest.raises(BundleError, match="already exists"):
        BundleWriter(path, None, None, [], "s").open()

    def failing_export() -> None:
        with BundleWriter(tmp_path / "c.jsonl", None, None, [], "s") as w:
            w.record(records[0])
            raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        failing_export()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no file, no temporary
    with pytest.raises(ValueError, match="timezone"):
        BundleWriter(tmp_path / "d.jsonl", datetime(2025, 1, 1), None, [], "s")
    with pytest.raises(AuditError):
        BundleWriter(tmp_path / "e.jsonl", None, None, [], "s").record(records[0])


# -- a property -------------------------------------------------------------------------------

PROP_RECORDS = build_chain(5, 24)
_PROP = Instance("broker-p")
for _seq in (3, 9, 17):
    _PROP.sign([PROP_RECORDS[_seq - 1]])
_PROP.sign([PROP_RECORDS[-1]], final=True)
PROP_HEADER = BundleHeader(T0, None, None, (KEY.public_bytes(),), "property")


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=len(PROP_RECORDS)))
def test_deleting_any_single_record_is_detected_at_its_seq(seq: int) -> None:
    bundle = Bundle(PROP_HEADER, without(PROP_RECORDS, seq), list(_PROP.signed))
    report = verify_bundle(bundle, [KEY.public_bytes()])
    p = first(report)
    assert (p.chain, p.seq) == (5, seq)
    assert p.kind == ("truncated" if seq == len(PROP_RECORDS) else "missing")


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=len(PROP_RECORDS)))
def test_any_rehashed_forgery_is_detected_after_the_last_matching_checkpoint(seq: int) -> None:
    bundle = Bundle(PROP_HEADER, reseal(PROP_RECORDS, seq, topic="forged"), list(_PROP.signed))
    p = first(verify_bundle(bundle, [KEY.public_bytes()]))
    last_good = max((s for s in (0, 3, 9, 17) if s < seq), default=0)
    assert (p.kind, p.chain, p.seq) == ("checkpoint_mismatch", 5, last_good + 1)
