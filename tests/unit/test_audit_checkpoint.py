"""Signed checkpoints: the exact body and signature format, parsing, and the signing key file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from securebroker.audit.checkpoint import (
    AuditError,
    Checkpoint,
    CheckpointFormatError,
    Head,
    SigningKey,
    checkpoint_body,
    public_key_id,
    verify_checkpoint_signature,
)
from securebroker.errors import BrokerError, ConfigError

H1, H2, PREV = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


def test_body_is_sorted_json_and_signature_is_domain_separated() -> None:
    key = SigningKey.generate()
    cp = key.sign_checkpoint(
        instance="host:42:abcd",
        n=2,
        prev=PREV,
        at_us=1_700_000_000_000_000,
        final=False,
        heads=[Head(7, 3, H2, 1_699_999_999_000_000), Head(1, 10, H1, 1_699_999_998_000_000)],
    )
    expected = (
        '{"at_us":1700000000000000,"final":false,"format":1,"heads":['
        f'{{"at_us":1699999998000000,"chain":1,"hash":"{H1.hex()}","seq":10}},'
        f'{{"at_us":1699999999000000,"chain":7,"hash":"{H2.hex()}","seq":3}}],'
        f'"instance":"host:42:abcd","n":2,"prev":"{PREV.hex()}"}}'
    ).encode()
    assert cp.body == expected
    assert [h.chain for h in cp.heads] == [1, 7]
    assert cp.digest() == hashlib.sha256(expected).digest()
    raw = key.public_bytes()
    assert len(raw) == 32
    assert key.key_id == public_key_id(raw) == hashlib.sha256(raw).hexdigest()[:16]
    assert cp.key_id == key.key_id
    public = ed25519.Ed25519PublicKey.from_public_bytes(raw)
    public.verify(cp.signature, b"sb-audit-checkpoint-v1" + expected)  # raises if wrong
    assert verify_checkpoint_signature(cp, raw)
    assert not verify_checkpoint_signature(cp, SigningKey.generate().public_bytes())
    assert not verify_checkpoint_signature(cp, b"short")
    tampered = Checkpoint.parse(cp.body.replace(b'"n":2', b'"n":3'), cp.signature, cp.key_id)
    assert not verify_checkpoint_signature(tampered, raw)


def test_json_round_trip_keeps_the_exact_body() -> None:
    key = SigningKey.generate()
    cp = key.sign_checkpoint("i-ünïcode", 1, None, 5, True, [Head(0, 1, H1, 4)])
    doc = cp.to_json()
    assert set(doc) == {"body", "signature", "key_id"}
    line = json.loads(json.dumps({"type": "checkpoint", **doc}))
    back = Checkpoint.from_json(line)
    assert back == cp and back.body == cp.body
    assert verify_checkpoint_signature(back, key.public_bytes())
    assert (back.instance, back.n, back.prev, back.final) == ("i-ünïcode", 1, None, True)
    assert back.head(0) == Head(0, 1, H1, 4) and back.head(9) is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"nope", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"format":1}', "missing"),
        (
            b'{"at_us":1,"extra":1,"final":false,"format":1,"heads":[],"instance":"i","n":1,'
            b'"prev":null}',
            "unknown field",
        ),
        (
            b'{"at_us":1,"final":false,"format":2,"heads":[],"instance":"i","n":1,"prev":null}',
            "unsupported format",
        ),
        (
            b'{"at_us":1,"final":false,"format":1,"heads":[],"instance":"i","n":"1","prev":null}',
            "'n' must be an integer",
        ),
        (
            b'{"at_us":1,"final":0,"format":1,"heads":[],"instance":"i","n":1,"prev":null}',
            "'final'",
        ),
        (
            b'{"at_us":1,"final":false,"format":1,"heads":[],"instance":"i","n":2,"prev":null}',
            "must name its predecessor",
        ),
        (
            b'{"at_us":1,"final":false,"format":1,"heads":[],"instance":"i","n":1,"prev":"ab"}',
            "'prev' must be 64 hex digits",
        ),
        (
            b'{"at_us":1,"final":false,"format":1,"heads":[{"chain":1}],"instance":"i","n":1,'
            b'"prev":null}',
            r"heads\[0\]",
        ),
        (
            b'{"at_us":1,"final":false,"format":1,"heads":[{"at_us":1,"chain":2,"hash":"'
            + H1.hex().encode()
            + b'","seq":1},{"at_us":1,"chain":1,"hash":"'
            + H1.hex().encode()
            + b'","seq":1}],"instance":"i","n":1,"prev":null}',
            "sorted by chain",
        ),
        (
            b'{"at_us":1,"final":false,"format":1,"heads":[],"instance":"","n":1,"prev":null}',
            "'instance'",
        ),
    ],
)
def test_bad_bodies_are_refused_with_the_field_named(body: bytes, expected: str) -> None:
    with pytest.raises(CheckpointFormatError, match=expected) as info:
        Checkpoint.parse(body, b"\x00" * 64, "0" * 16)
    assert isinstance(info.value, ValueError) and isinstance(info.value, BrokerError)


def test_bad_export_forms_are_refused() -> None:
    good = SigningKey.generate().sign_checkpoint("i", 1, None, 1, False, []).to_json()
    for change, expected in (
        ({"body": 5}, "'body' must be a string"),
        ({"signature": "zz"}, "not valid hex"),
        ({"signature": "00"}, "64 bytes"),
        ({"key_id": "ABC"}, "key_id"),
    ):
        with pytest.raises(CheckpointFormatError, match=expected):
            Checkpoint.from_json({**good, **change})


def test_signing_refuses_what_a_verifier_would_refuse() -> None:
    key = SigningKey.generate()
    with pytest.raises(CheckpointFormatError, match="one per chain"):
        key.sign_checkpoint("i", 1, None, 1, False, [Head(1, 1, H1, 1), Head(1, 2, H2, 1)])
    with pytest.raises(CheckpointFormatError, match="32 bytes"):
        key.sign_checkpoint("i", 1, None, 1, False, [Head(1, 1, b"short", 1)])
    with pytest.raises(CheckpointFormatError, match="no 'prev'"):
        checkpoint_body("i", 1, PREV, 1, False, [])


def test_key_file_create_and_load(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "audit-signing.pem"
    key = SigningKey.create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in path.parent.iterdir()] == ["audit-signing.pem"]  # no temporaries
    loaded = SigningKey.load(path)
    assert loaded.public_bytes() == key.public_bytes() and loaded.key_id == key.key_id
    assert key.key_id in repr(key) and "PRIVATE" not in repr(key)
    cp = loaded.sign_checkpoint("i", 1, None, 1, False, [])
    assert verify_checkpoint_signature(cp, key.public_bytes())
    with pytest.raises(AuditError, match="already exists"):
        SigningKey.create(path)
    assert SigningKey.load(path).key_id == key.key_id  # untouched


def test_key_file_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        SigningKey.load(tmp_path / "absent.pem")
    path = tmp_path / "k.pem"
    SigningKey.create(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="accessible by other users; chmod 600"):
        SigningKey.load(path)

    def private_file(name: str, data: bytes) -> Path:
        p = tmp_path / name
        p.write_bytes(data)
        os.chmod(p, 0o600)
        return p

    with pytest.raises(ConfigError, match="not a PEM private key"):
        SigningKey.load(private_file("junk.pem", b"junk"))
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ConfigError, match="must be an Ed25519 key"):
        SigningKey.load(private_file("ec.pem", ec_pem))
    encrypted = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(ConfigError, match="encrypted"):
        SigningKey.load(private_file("enc.pem", encrypted))
