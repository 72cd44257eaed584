"""The offline verifier: check an export bundle with no database and no broker.

``verify_bundle`` reports *problems* (evidence of tampering or loss; the bundle fails) and
*warnings* (limits of what this bundle can prove; it still passes). Each problem names the chain
and the first bad sequence number it can pin down:

``altered``              a record's hash does not match its contents (edited in place)
``duplicate``            two different records claim the same (chain, seq)
``missing``              a gap in a chain (the message gives the range), or, for an export without
                         ``since``, a chain that does not start at seq 1
``broken_link``          a record's ``prev_hash`` is not its predecessor's hash (the predecessor
                         was rewritten and re-hashed, or this link was edited), or seq 1 does not
                         start from the chain's genesis value
``truncated``            a signed checkpoint vouches for records the bundle does not have (the
                         newest records were deleted, or a chain in the export window is gone)
``checkpoint_mismatch``  a signed head hash disagrees with the bundle: the chain was rewritten and
                         consistently re-hashed without the signing key; the first bad seq is one
                         past the last checkpointed head that still matches
``bad_signature``        a checkpoint's signature does not verify (or its key is unknown)
``untrusted_key``        a checkpoint verifies, but with a key the auditor did not pin
``checkpoint_missing``   an instance's checkpoint numbers skip (a checkpoint was deleted)
``checkpoint_link``      a checkpoint's ``prev`` is not the digest of the instance's previous one
``checkpoint_conflict``  two different signed checkpoints share an instance and number
``malformed``            a line of the bundle could not be parsed

Only checkpoints whose signature verifies (and, with pinned keys, with a pinned key) vouch for
anything. Record order inside the bundle does not matter. Problems are sorted by chain, then
seq; problems that belong to no chain (checkpoints, malformed lines) come last.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from securebroker.audit.bundle import Bundle
from securebroker.audit.checkpoint import (
    MAX_CHAIN,
    Checkpoint,
    Head,
    public_key_id,
    verify_checkpoint_signature,
)
from securebroker.audit.record import AuditRecord, from_us, genesis, recompute, to_us

__all__ = ["KINDS", "Problem", "Report", "verify_bundle"]

KINDS: Final = (
    "altered",
    "duplicate",
    "missing",
    "broken_link",
    "truncated",
    "checkpoint_mismatch",
    "bad_signature",
    "untrusted_key",
    "checkpoint_missing",
    "checkpoint_link",
    "checkpoint_conflict",
    "malformed",
)
_KIND_ORDER: Final = {k: i for i, k in enumerate(KINDS)}
_SHORT: Final = 16  # hex characters of a hash shown in messages


@dataclass(frozen=True, slots=True)
class Problem:
    chain: int | None
    seq: int | None
    kind: str
    message: str
    #: the checkpoint concerned, when there is one
    instance: str | None = None
    n: int | None = None
    #: the bundle line, for malformed lines
    line: int | None = None

    @property
    def where(self) -> str:
        if self.chain is not None:
            return f"chain {self.chain}" + ("" if self.seq is None else f" seq {self.seq}")
        if self.line is not None:
            return f"line {self.line}"
        if self.instance is not None:
            return f"checkpoint {self.instance}#{self.n}"
        return "bundle"

    def to_json(self) -> dict[str, Any]:
        return {
            "chain": self.chain,
            "seq": self.seq,
            "kind": self.kind,
            "message": self.message,
            "instance": self.instance,
            "n": self.n,
            "line": self.line,
        }


def _sort_key(p: Problem) -> tuple[Any, ...]:
    return (
        p.chain is None,
        p.chain or 0,
        p.seq is None,
        p.seq or 0,
        _KIND_ORDER.get(p.kind, len(KINDS)),
        p.instance or "",
        p.n or 0,
        p.line or 0,
        p.message,
    )


@dataclass(slots=True)
class Report:
    problems: list[Problem]
    warnings: list[str]
    records: int
    chains: int
    checkpoints: int
    #: checkpoints whose signature verified (with a pinned key, when keys were pinned)
    checkpoints_verified: int
    #: key ids listed in the bundle header
    header_key_ids: list[str]
    #: key ids that verified at least one checkpoint
    signing_key_ids: list[str]
    #: whether the auditor pinned trusted keys
    pinned: bool
    source: str = ""
    created_at: datetime | None = None
    since: datetime | None = None
    until: datetime | None = None
    trusted_key_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "first_problem": None if self.first_problem is None else self.first_problem.to_json(),
            "problems": [p.to_json() for p in self.problems],
            "warnings": list(self.warnings),
            "records": self.records,
            "chains": self.chains,
            "checkpoints": self.checkpoints,
            "checkpoints_verified": self.checkpoints_verified,
            "header_key_ids": list(self.header_key_ids),
            "signing_key_ids": list(self.signing_key_ids),
            "trusted_key_ids": list(self.trusted_key_ids),
            "pinned": self.pinned,
            "source": self.source,
            "created_at": _iso(self.created_at),
            "since": _iso(self.since),
            "until": _iso(self.until),
        }

    def format_text(self) -> str:
        lines = [
            f"audit bundle from {self.source or '(unknown source)'}, "
            f"created {_iso(self.created_at) or '(unknown)'}",
            f"window: {_iso(self.since) or 'the beginning'} .. {_iso(self.until) or 'the end'}",
            f"records: {self.records} in {self.chains} chain(s); "
            f"checkpoints: {self.checkpoints}, {self.checkpoints_verified} verified",
        ]
        if self.signing_key_ids:
            state = "pinned" if self.pinned else "NOT pinned"
            lines.append(f"checkpoint signing key(s): {', '.join(self.signing_key_ids)} ({state})")
        if self.ok:
            lines.append("result: OK, no tampering or loss found")
        else:
            first = self.problems[0]
            lines.append(
                f"result: FAILED, {len(self.problems)} problem(s); "
                f"first: {first.where}: {first.kind}"
            )
            lines.append("problems:")
            lines.extend(
                f"  {p.kind}: {p.message}"
                if p.line is not None
                else f"  {p.where}: {p.kind}: {p.message}"
                for p in self.problems
            )
        if self.warnings:
            lines.append("warnings:")
            lines.extend(f"  - {w}" for w in self.warnings)
        return "\n".join(lines) + "\n"


# -- the verifier -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Claim:
    """One signed head, with the checkpoint that states it."""

    head: Head
    cp: Checkpoint


def verify_bundle(bundle: Bundle, trusted_keys: Sequence[bytes] | None = None) -> Report:
    """Verify ``bundle``. With ``trusted_keys`` (raw 32-byte Ed25519 public keys) only
    checkpoints signed by one of them count; without, any key in the bundle header is accepted
    and a warning names it so the auditor can compare its id with the broker's."""
    problems: list[Problem] = []
    warnings: list[str] = []
    header = bundle.header
    since_us = None if header.since is None else to_us(header.since)
    until_us = None if header.until is None else to_us(header.until)

    def in_window(at_us: int) -> bool:
        return (since_us is None or at_us >= since_us) and (until_us is None or at_us <= until_us)

    problems.extend(
        Problem(None, None, "malformed", f"line {line}: {msg}", line=line)
        for line, msg in bundle.malformed
    )

    chains = _check_records(
        bundle.records, header.since is None, problems, warnings, bundle.anchors
    )
    valid, verified_by = _check_signatures(
        bundle.checkpoints, header.public_keys, trusted_keys, problems, warnings
    )
    _check_instances(valid, problems, warnings)

    claims: dict[int, list[_Claim]] = defaultdict(list)
    for cp in valid:
        for h in cp.heads:
            claims[h.chain].append(_Claim(h, cp))
    for chain in sorted(set(chains) | set(claims)):
        _check_heads(
            chain,
            chains.get(chain, {}),
            claims.get(chain, []),
            in_window,
            header.since,
            problems,
            warnings,
            anchored=chain in bundle.anchors,
        )

    if not bundle.checkpoints:
        warnings.append(
            "the bundle holds no checkpoints: records were checked for consistency only; "
            "deleted newest records or a consistently re-hashed forgery cannot be detected"
        )
    elif not valid:
        warnings.append("no checkpoint in the bundle could be verified")
    signing_ids = sorted(verified_by)
    if trusted_keys is None:
        warnings.extend(
            f"checkpoint signing key {key_id} is not pinned: compare this key id with the "
            f"broker's published audit key, or verify again with --public-key "
            f"({verified_by[key_id]} checkpoint(s) signed with it)"
            for key_id in signing_ids
        )
    problems.sort(key=_sort_key)
    return Report(
        problems=problems,
        warnings=warnings,
        records=len(bundle.records),
        chains=len(chains),
        checkpoints=len(bundle.checkpoints),
        checkpoints_verified=sum(verified_by.values()),
        header_key_ids=[public_key_id(k) for k in header.public_keys],
        signing_key_ids=signing_ids,
        pinned=trusted_keys is not None,
        source=header.source,
        created_at=header.created_at,
        since=header.since,
        until=header.until,
        trusted_key_ids=[public_key_id(k) for k in trusted_keys or ()],
    )


def _check_records(
    records: Sequence[AuditRecord],
    from_start: bool,
    problems: list[Problem],
    warnings: list[str],
    anchors: Mapping[int, tuple[int, bytes]] | None = None,
) -> dict[int, dict[int, AuditRecord]]:
    """Checks 1 and 2: each record's own hash, then each chain's sequence and links (from the
    export's anchor, when the window starts mid-chain). Returns one representative record per
    (chain, seq) for the checkpoint checks."""
    by_chain: dict[int, dict[int, list[AuditRecord]]] = defaultdict(lambda: defaultdict(list))
    altered: set[int] = set()  # id() of records whose hash does not match their contents
    for r in records:
        by_chain[r.chain][r.seq].append(r)
        actual = recompute(r)
        if actual != r.hash:
            altered.add(id(r))
            problems.append(
                Problem(
                    r.chain,
                    r.seq,
                    "altered",
                    f"record {r.seq} does not match its hash: its contents were changed after it "
                    f"was written (stored {_h(r.hash)}, contents hash to {_h(actual)})",
                )
            )
    chains: dict[int, dict[int, AuditRecord]] = {}
    for chain, by_seq in by_chain.items():
        rep: dict[int, AuditRecord] = {}
        for seq, copies in by_seq.items():
            rep[seq] = next((r for r in copies if id(r) not in altered), copies[0])
            if any(r != copies[0] for r in copies[1:]):
                problems.append(
                    Problem(
                        chain,
                        seq,
                        "duplicate",
                        f"{len(copies)} different records claim seq {seq} "
                        f"(hashes {', '.join(sorted(_h(r.hash) for r in copies))})",
                    )
                )
            elif len(copies) > 1:
                warnings.append(
                    f"chain {chain} seq {seq} appears {len(copies)} times (identical copies)"
                )
        chains[chain] = rep
        seqs = sorted(rep)
        lo = seqs[0]
        if lo == 1:
            if 0 <= chain <= MAX_CHAIN and rep[1].prev_hash != genesis(chain):
                problems.append(
                    Problem(
                        chain,
                        1,
                        "broken_link",
                        f"record 1 does not start from chain {chain}'s genesis value "
                        f"(prev_hash {_h(rep[1].prev_hash)}): the chain's start was replaced",
                    )
                )
        elif from_start:
            problems.append(
                Problem(
                    chain,
                    1,
                    "missing",
                    f"{_range(1, lo - 1)} missing: the bundle has no 'since' (it claims the whole "
                    f"trail) but chain {chain} starts at seq {lo}",
                )
            )
        elif anchors and chain in anchors:
            a_seq, a_hash = anchors[chain]
            if lo > a_seq + 1:
                problems.append(
                    Problem(
                        chain,
                        a_seq + 1,
                        "missing",
                        f"{_range(a_seq + 1, lo - 1)} missing from the start of the window: "
                        f"the last record before it is seq {a_seq}",
                    )
                )
            elif lo == a_seq + 1 and rep[lo].prev_hash != a_hash:
                problems.append(
                    Problem(
                        chain,
                        lo,
                        "broken_link",
                        f"record {lo} links to {_h(rep[lo].prev_hash)} but the last record "
                        f"before the window (seq {a_seq}) hashes to {_h(a_hash)}",
                    )
                )
        for before, seq in itertools.pairwise(seqs):
            if seq > before + 1:
                problems.append(
                    Problem(
                        chain,
                        before + 1,
                        "missing",
                        f"{_range(before + 1, seq - 1)} missing "
                        f"(the chain jumps from seq {before} to seq {seq})",
                    )
                )
            elif rep[seq].prev_hash != rep[before].hash:
                problems.append(
                    Problem(
                        chain,
                        seq,
                        "broken_link",
                        f"record {seq} links to {_h(rep[seq].prev_hash)} but record {before} "
                        f"hashes to {_h(rep[before].hash)}: record {before} was rewritten and "
                        f"re-hashed, or this link was changed",
                    )
                )
    return chains


def _check_signatures(
    checkpoints: Sequence[Checkpoint],
    header_keys: Sequence[bytes],
    trusted_keys: Sequence[bytes] | None,
    problems: list[Problem],
    warnings: list[str],
) -> tuple[list[Checkpoint], dict[str, int]]:
    """Check 3, signatures: returns the checkpoints that count, and how many each key verified."""
    trusted = None if trusted_keys is None else set(trusted_keys)
    keys: dict[str, bytes] = {}
    # pinned keys first: a header key cannot shadow a pinned key by (near-)colliding key id
    for k in [*(trusted_keys or ()), *header_keys]:
        keys.setdefault(public_key_id(k), k)
    valid: list[Checkpoint] = []
    seen: set[tuple[bytes, bytes]] = set()
    verified_by: dict[str, int] = defaultdict(int)
    for cp in checkpoints:
        if (cp.body, cp.signature) in seen:
            warnings.append(f"{_cp(cp)} appears more than once (identical copies)")
            continue
        seen.add((cp.body, cp.signature))
        raw = keys.get(cp.key_id)
        if raw is None:
            problems.append(
                _cp_problem(
                    cp,
                    "bad_signature",
                    f"{_cp(cp)} is signed by key {cp.key_id}, which is neither in the bundle "
                    "header nor among the trusted keys",
                )
            )
        elif not verify_checkpoint_signature(cp, raw):
            problems.append(
                _cp_problem(
                    cp,
                    "bad_signature",
                    f"{_cp(cp)}: the signature does not verify with key {cp.key_id} "
                    "(the checkpoint was altered or signed by another key)",
                )
            )
        elif trusted is not None and raw not in trusted:
            problems.append(
                _cp_problem(
                    cp,
                    "untrusted_key",
                    f"{_cp(cp)} is signed by key {cp.key_id}, which is not one of the trusted "
                    f"keys ({', '.join(sorted(public_key_id(k) for k in trusted)) or 'none'})",
                )
            )
        else:
            valid.append(cp)
            verified_by[cp.key_id] += 1
    return valid, dict(verified_by)


def _check_instances(
    valid: Sequence[Checkpoint], problems: list[Problem], warnings: list[str]
) -> None:
    """Check 3, per instance: consecutive numbers, each naming its predecessor's digest."""
    by_instance: dict[str, dict[int, Checkpoint]] = defaultdict(dict)
    for cp in valid:
        other = by_instance[cp.instance].get(cp.n)
        if other is None:
            by_instance[cp.instance][cp.n] = cp
        else:
            problems.append(
                _cp_problem(
                    cp,
                    "checkpoint_conflict",
                    f"two different signed checkpoints are number {cp.n} of instance "
                    f"{cp.instance} (digests {_h(other.digest())} and {_h(cp.digest())})",
                )
            )
    for instance, by_n in sorted(by_instance.items()):
        ordered = [by_n[n] for n in sorted(by_n)]
        for before, cp in itertools.pairwise(ordered):
            if before.final:
                warnings.append(
                    f"instance {instance} wrote {_cp(cp)} after its final checkpoint {_cp(before)}"
                )
            if cp.n != before.n + 1:
                problems.append(
                    Problem(
                        None,
                        None,
                        "checkpoint_missing",
                        f"instance {instance}: {_range_n(before.n + 1, cp.n - 1)} missing "
                        f"(between {_cp(before)} and {_cp(cp)})",
                        instance=instance,
                        n=before.n + 1,
                    )
                )
            elif cp.prev != before.digest():
                problems.append(
                    _cp_problem(
                        cp,
                        "checkpoint_link",
                        f"{_cp(cp)} names {_h(cp.prev)} as its predecessor, but "
                        f"{_cp(before)} has digest {_h(before.digest())}",
                    )
                )


def _check_heads(
    chain: int,
    rep: dict[int, AuditRecord],
    claims: list[_Claim],
    in_window: Callable[[int], bool],
    since: datetime | None,
    problems: list[Problem],
    warnings: list[str],
    *,
    anchored: bool = False,
) -> None:
    """Check 4 and the warnings of check 5 for one chain (``anchored``: the export gave the
    record before the window, which check 2 linked to)."""
    lo = min(rep) if rep else None
    hi = max(rep) if rep else None

    def claimed(seq: int) -> bytes | None:
        """The hash the bundle implies for record ``seq``: its own, or its successor's link."""
        if seq in rep:
            return rep[seq].hash
        if seq + 1 in rep:
            return rep[seq + 1].prev_hash
        return None

    ordered = sorted(claims, key=lambda c: (c.head.seq, c.cp.at_us, c.cp.instance, c.cp.n))

    # records the export window should hold before the chain's first record (or the whole
    # chain); without 'since', a chain not starting at seq 1 is already reported as missing
    front = [
        c
        for c in ordered
        if (lo is None or (since is not None and c.head.seq < lo)) and in_window(c.head.at_us)
    ]
    if front:
        c = front[0]
        before = [
            x.head.seq for x in ordered if not in_window(x.head.at_us) and x.head.seq < c.head.seq
        ]
        first = (max(before) + 1) if before else 1
        if lo is None:
            what = f"chain {chain} has no records in the bundle"
            gone = f"{_range(first, c.head.seq)} missing" + (
                " (the whole chain up to that head)" if first == 1 else ""
            )
        else:
            what = f"the bundle's chain {chain} starts at seq {lo}"
            gone = (
                f"{_range(first, lo - 1)} missing (certainly from seq {c.head.seq}; earlier "
                "ones if they too were written inside the window)"
            )
        problems.append(
            _cp_problem(
                c.cp,
                "truncated",
                f"{what}, but {_cp(c.cp)} says seq {c.head.seq} was written at "
                f"{_when(c.head.at_us)}, inside the export window: {gone}",
                chain=chain,
                seq=first,
            )
        )
    if rep:
        assert lo is not None and hi is not None
        # the newest records: a signed head beyond the end of the chain in the bundle
        tail = [c for c in ordered if c.head.seq > hi and in_window(c.head.at_us)]
        if tail:
            c = tail[-1]
            problems.append(
                _cp_problem(
                    c.cp,
                    "truncated",
                    f"{_range(hi + 1, c.head.seq)} missing from the end of the chain: "
                    f"{_cp(c.cp)} says the head of chain {chain} was seq {c.head.seq} "
                    f"(written {_when(c.head.at_us)}), the bundle ends at seq {hi}",
                    chain=chain,
                    seq=hi + 1,
                )
            )
        _check_mismatches(chain, lo, ordered, claimed, problems)

    # warnings: the chain's start, and records no checkpoint vouches for
    if rep and lo is not None and lo > 1 and since is not None and not anchored:
        anchored = any(c.head.seq == lo - 1 and claimed(lo - 1) == c.head.hash for c in ordered)
        if not anchored:
            warnings.append(
                f"chain {chain} starts at seq {lo} in this bundle (the export starts mid-chain): "
                f"its link to seq {lo - 1} ({_h(rep[lo].prev_hash)}) is the anchor and is not "
                "confirmed by a checkpoint in the bundle"
            )
    if rep and hi is not None:
        if not ordered:
            warnings.append(
                f"chain {chain} ({len(rep)} record(s), seq {min(rep)}..{hi}) is not covered by "
                "any signed checkpoint"
            )
        else:
            last = max(c.head.seq for c in ordered)
            after = sum(1 for s in rep if s > last)
            if after:
                warnings.append(
                    f"{after} record(s) of chain {chain} after seq {last} are not yet covered by "
                    "a signed checkpoint"
                )


def _check_mismatches(
    chain: int,
    lo: int,
    ordered: list[_Claim],
    claimed: Callable[[int], bytes | None],
    problems: list[Problem],
) -> None:
    """Signed head hashes against the bundle. One problem per run of disagreeing heads, at one
    past the last head that still matched (or the chain's first record in the bundle)."""
    last_match: _Claim | None = None
    run: list[_Claim] = []

    def flush() -> None:
        if not run:
            return
        c = run[0]
        first = last_match.head.seq + 1 if last_match is not None else lo
        if last_match is not None:
            explain = (
                f"the last checkpoint that still matches is {_cp(last_match.cp)} at seq "
                f"{last_match.head.seq}, so the rewrite starts between seq {first} and "
                f"{c.head.seq}"
            )
        else:
            explain = (
                f"no earlier checkpoint matches, so the rewrite may start at seq {first}, the "
                "chain's first record in the bundle"
            )
        more = f"; {len(run) - 1} later signed head(s) also disagree" if len(run) > 1 else ""
        problems.append(
            _cp_problem(
                c.cp,
                "checkpoint_mismatch",
                f"chain rewritten and re-hashed: {_cp(c.cp)} says seq {c.head.seq} has hash "
                f"{_h(c.head.hash)}, the bundle has {_h(claimed(c.head.seq))}; {explain}{more}",
                chain=chain,
                seq=first,
            )
        )
        run.clear()

    for c in ordered:
        have = claimed(c.head.seq)
        if have is None:
            continue  # not in the bundle: truncation and gaps are reported elsewhere
        if have == c.head.hash:
            flush()
            last_match = c
        else:
            run.append(c)
    flush()


# -- formatting helpers -----------------------------------------------------------------------


def _cp_problem(
    cp: Checkpoint, kind: str, message: str, *, chain: int | None = None, seq: int | None = None
) -> Problem:
    return Problem(chain, seq, kind, message, instance=cp.instance, n=cp.n)


def _cp(cp: Checkpoint) -> str:
    return f"checkpoint {cp.instance}#{cp.n} ({_when(cp.at_us)})"


def _h(value: bytes | None) -> str:
    return "null" if value is None else value.hex()[:_SHORT] + "…"


def _when(at_us: int) -> str:
    """A time for a message; never fails, even on an absurd (unverified) value."""
    try:
        return from_us(at_us).isoformat()
    except (OverflowError, ValueError, OSError):
        return f"at_us={at_us}"


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def _range(first: int, last: int) -> str:
    return f"record {first} is" if first == last else f"records {first}..{last} are"


def _range_n(first: int, last: int) -> str:
    return f"checkpoint #{first} is" if first == last else f"checkpoints #{first}..#{last} are"
