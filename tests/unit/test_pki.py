"""Development PKI, peer identities, CRLs and TLS context configuration errors."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import shutil
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securebroker.errors import AuthenticationError, ConfigError
from securebroker.tls import (
    DevPki,
    client_context,
    ensure_dev_pki,
    issue_client_cert,
    peer_identity,
    server_context,
    write_crl,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino)
        for p in sorted(directory.iterdir())
    }


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _der(path: Path) -> bytes:
    return _cert(path).public_bytes(serialization.Encoding.DER)


def _changed(
    before: dict[str, tuple[bytes, int, int]], after: dict[str, tuple[bytes, int, int]]
) -> set[str]:
    return {name for name in after if before.get(name) != after[name]}


# --------------------------------------------------------------------------------------------
# ensure_dev_pki


def test_creates_expected_files_and_certificates(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path / "pki", now=T0)
    assert {p.name for p in (tmp_path / "pki").iterdir()} == {
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "dev-client.pem",
        "dev-client.key",
        "dev-admin.pem",
        "dev-admin.key",
    }
    assert pki.crl is None
    assert set(pki.clients) == {"dev-client", "dev-admin"}

    ca = _cert(pki.ca_cert)
    ca_public = ca.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    assert ca_public.curve.name == "secp256r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= timedelta(days=3650)

    server = _cert(pki.server_cert)
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.not_valid_after_utc - T0 == timedelta(days=365)

    client = _cert(pki.clients["dev-client"][0])
    client.verify_directly_issued_by(ca)
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-client"
    sans = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://securebroker.dev/dev-client"
    ]
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_second_call_changes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    first = ensure_dev_pki(directory)
    before = _snapshot(directory)
    second = ensure_dev_pki(directory)
    assert _snapshot(directory) == before
    assert second == first


def test_key_files_are_0600_and_directory_0700(tmp_path: Path) -> None:
    directory = tmp_path / "nested" / "pki"
    pki = ensure_dev_pki(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    keys = [pki.ca_key, pki.server_key, *(key for _, key in pki.clients.values())]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    issued_cert, issued_key = issue_client_cert(pki, "extra")
    assert stat.S_IMODE(issued_key.stat().st_mode) == 0o600
    assert issued_cert.exists()
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]

    # A key file that became group/world readable is narrowed back, content untouched.
    content = pki.server_key.read_bytes()
    pki.server_key.chmod(0o644)
    ensure_dev_pki(directory)
    assert stat.S_IMODE(pki.server_key.stat().st_mode) == 0o600
    assert pki.server_key.read_bytes() == content


def test_leaves_expiring_within_7_days_are_regenerated_ca_kept(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    ensure_dev_pki(directory, now=T0)
    before = _snapshot(directory)

    # 357 days later every leaf (valid 365 days) still has 8 days left: nothing changes.
    ensure_dev_pki(directory, now=T0 + timedelta(days=357))
    assert _snapshot(directory) == before

    # 360 days later the leaves (365 days) have 5 days left: all leaves, but not the CA.
    later = T0 + timedelta(days=360)
    pki = ensure_dev_pki(directory, now=later)
    after = _snapshot(directory)
    assert _changed(before, after) == {
        "server.pem",
        "server.key",
        "dev-client.pem",
        "dev-client.key",
        "dev-admin.pem",
        "dev-admin.key",
    }
    assert _cert(pki.server_cert).not_valid_after_utc == later + timedelta(days=365)
    _cert(pki.server_cert).verify_directly_issued_by(_cert(pki.ca_cert))


def test_expired_leaf_is_regenerated(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path / "pki")
    now = datetime.now(UTC)
    issue_client_cert(
        pki, "dev-client", not_before=now - timedelta(days=10), not_after=now - timedelta(days=1)
    )
    before = _snapshot(pki.directory)
    ensure_dev_pki(pki.directory, now=now)
    changed = _changed(before, _snapshot(pki.directory))
    assert {"dev-client.pem", "dev-client.key"} <= changed
    assert "ca.pem" not in changed
    assert _cert(pki.clients["dev-client"][0]).not_valid_after_utc > now


def test_ca_expiring_within_30_days_regenerates_everything(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    pki = ensure_dev_pki(directory, now=T0)
    old_ca = _cert(pki.ca_cert)
    before = _snapshot(directory)
    later = old_ca.not_valid_after_utc - timedelta(days=29)
    ensure_dev_pki(directory, now=later)
    after = _snapshot(directory)
    assert _changed(before, after) == set(before)
    new_ca = _cert(pki.ca_cert)
    assert new_ca.serial_number != old_ca.serial_number
    for cert_path in (pki.server_cert, *(cert for cert, _ in pki.clients.values())):
        _cert(cert_path).verify_directly_issued_by(new_ca)


def test_leaf_not_signed_by_current_ca_is_regenerated(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path / "pki")
    other = ensure_dev_pki(tmp_path / "other")
    shutil.copyfile(other.server_cert, pki.server_cert)
    shutil.copyfile(other.server_key, pki.server_key)
    before = _snapshot(pki.directory)
    ensure_dev_pki(pki.directory)
    assert _changed(before, _snapshot(pki.directory)) == {"server.pem", "server.key"}
    _cert(pki.server_cert).verify_directly_issued_by(_cert(pki.ca_cert))


def test_missing_or_mismatched_files_are_regenerated(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path / "pki")
    pki.clients["dev-admin"][1].unlink()
    shutil.copyfile(pki.server_key, pki.clients["dev-client"][1])  # key no longer matches cert
    before = _snapshot(pki.directory)
    ensure_dev_pki(pki.directory)
    assert _changed(before, _snapshot(pki.directory)) == {
        "dev-admin.pem",
        "dev-admin.key",
        "dev-client.pem",
        "dev-client.key",
    }


def test_changed_server_names_regenerate_server_certificate(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path / "pki")
    before = _snapshot(pki.directory)
    ensure_dev_pki(pki.directory, server_names=("broker.test", "10.0.0.1"))
    assert _changed(before, _snapshot(pki.directory)) == {"server.pem", "server.key"}
    ident = peer_identity(_der(pki.server_cert))
    assert ident.sans == ("dns:broker.test", "ip:10.0.0.1")


def test_invalid_client_names_are_rejected(tmp_path: Path) -> None:
    for bad in ("../evil", "ca", "", "a b", ".hidden"):
        with pytest.raises(ConfigError):
            ensure_dev_pki(tmp_path / "pki", clients=(bad,))
    with pytest.raises(ValueError, match="timezone-aware"):
        ensure_dev_pki(tmp_path / "pki", now=datetime(2030, 1, 1))


# --------------------------------------------------------------------------------------------
# peer_identity


def test_peer_identity_of_client_certificate(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path / "pki")
    der = _der(pki.clients["dev-client"][0])
    ident = peer_identity(der)
    assert ident.subject == "CN=dev-client"
    assert ident.common_name == "dev-client"
    assert ident.sans == ("uri:spiffe://securebroker.dev/dev-client",)
    assert ident.principal == "spiffe://securebroker.dev/dev-client"
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert ident.thumbprint_s256 == expected
    assert len(ident.thumbprint_s256) == 43
    assert "=" not in ident.thumbprint_s256
    assert ident.not_after == _cert(pki.clients["dev-client"][0]).not_valid_after_utc


def test_peer_identity_of_server_certificate_falls_back_to_cn(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path / "pki")
    ident = peer_identity(_der(pki.server_cert))
    assert ident.sans == ("dns:localhost", "ip:127.0.0.1", "ip:::1")
    assert ident.common_name == "localhost"
    assert ident.principal == "localhost"


def _self_signed(subject: x509.Name, sans: list[x509.GeneralName] | None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0)
        .not_valid_after(T0 + timedelta(days=1))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_peer_identity_falls_back_to_subject_and_formats_all_san_kinds() -> None:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Payments"),
        ]
    )
    ident = peer_identity(_self_signed(subject, None))
    assert ident.common_name is None
    assert ident.sans == ()
    assert ident.principal == ident.subject == "OU=Payments,O=Acme"

    sans: list[x509.GeneralName] = [
        x509.RFC822Name("ops@example.com"),
        x509.DNSName("svc.example.com"),
        x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
        x509.UniformResourceIdentifier("spiffe://example.com/a"),
        x509.UniformResourceIdentifier("spiffe://example.com/b"),
    ]
    ident = peer_identity(_self_signed(subject, sans))
    assert ident.sans == (
        "email:ops@example.com",
        "dns:svc.example.com",
        "ip:192.0.2.7",
        "uri:spiffe://example.com/a",
        "uri:spiffe://example.com/b",
    )
    assert ident.principal == "spiffe://example.com/a"


def test_peer_identity_rejects_garbage() -> None:
    with pytest.raises(AuthenticationError):
        peer_identity(b"\x30\x03\x02\x01\x00")


# --------------------------------------------------------------------------------------------
# CRL


def test_crl_contents(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path / "pki")
    serial = _cert(pki.clients["dev-admin"][0]).serial_number
    before = datetime.now(UTC)
    path = write_crl(pki, [serial, 12345])
    assert path == pki.directory / "crl.pem"
    crl = x509.load_pem_x509_crl(path.read_bytes())
    ca = _cert(pki.ca_cert)
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(ca_key)
    assert crl.issuer == ca.subject
    assert sorted(r.serial_number for r in crl) == sorted([serial, 12345])
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    not_revoked = _cert(pki.clients["dev-client"][0]).serial_number
    assert crl.get_revoked_certificate_by_serial_number(not_revoked) is None
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=7)
    assert crl.next_update_utc >= before + timedelta(days=7) - timedelta(minutes=10)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1

    write_crl(pki, [])
    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert len(crl) == 0
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2

    # ensure_dev_pki reports an existing CRL and leaves a fresh one alone.
    crl_bytes = path.read_bytes()
    again = ensure_dev_pki(pki.directory)
    assert again.crl == path
    assert path.read_bytes() == crl_bytes


def test_expiring_crl_is_resigned_with_the_same_serials(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path / "pki")
    path = write_crl(pki, [7, 8])
    old = x509.load_pem_x509_crl(path.read_bytes())
    assert old.next_update_utc is not None
    ensure_dev_pki(pki.directory, now=old.next_update_utc - timedelta(hours=12))
    new = x509.load_pem_x509_crl(path.read_bytes())
    assert new.next_update_utc is not None
    assert new.next_update_utc > old.next_update_utc
    assert sorted(r.serial_number for r in new) == [7, 8]
    assert new.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2


def test_crl_is_reset_when_ca_is_replaced(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path / "pki", now=T0)
    write_crl(pki, [1, 2, 3], path=pki.directory / "crl.pem")
    ensure_dev_pki(pki.directory, now=T0 + timedelta(days=3640))
    crl = x509.load_pem_x509_crl((pki.directory / "crl.pem").read_bytes())
    ca_key = _cert(pki.ca_cert).public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(ca_key)
    assert len(crl) == 0


# --------------------------------------------------------------------------------------------
# TLS contexts: configuration errors


def _pki(tmp_path: Path) -> DevPki:
    return ensure_dev_pki(tmp_path / "pki")


def test_contexts_build_from_dev_pki(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    write_crl(pki, [])
    ctx = server_context(
        cert=pki.server_cert, key=pki.server_key, ca=pki.ca_cert, crl=pki.directory / "crl.pem"
    )
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    assert ctx.options & ssl.OP_NO_COMPRESSION
    cert, key = pki.clients["dev-client"]
    cctx = client_context(cert=cert, key=key, ca=pki.ca_cert, min_version="1.2")
    assert cctx.check_hostname
    assert cctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_missing_files_raise_config_error_naming_the_file(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    missing = tmp_path / "nope.key"
    with pytest.raises(ConfigError, match=r"nope\.key") as info:
        server_context(cert=pki.server_cert, key=missing, ca=pki.ca_cert)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"not found: .*missing-ca\.pem"):
        server_context(cert=pki.server_cert, key=pki.server_key, ca=tmp_path / "missing-ca.pem")
    with pytest.raises(ConfigError, match=r"missing-crl\.pem"):
        server_context(
            cert=pki.server_cert,
            key=pki.server_key,
            ca=pki.ca_cert,
            crl=tmp_path / "missing-crl.pem",
        )


def test_bad_key_never_leaks_key_material(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    key_text = pki.clients["dev-client"][1].read_text()
    # Key that does not match the certificate.
    with pytest.raises(ConfigError) as info:
        server_context(cert=pki.server_cert, key=pki.clients["dev-client"][1], ca=pki.ca_cert)
    message = str(info.value)
    assert "dev-client.key" in message
    assert "\n" not in message
    body = "".join(key_text.splitlines()[1:-1])
    assert body[:16] not in message


def test_crl_file_with_certificates_or_expired_is_refused(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    with pytest.raises(ConfigError, match="no PEM 'X509 CRL'"):
        server_context(cert=pki.server_cert, key=pki.server_key, ca=pki.ca_cert, crl=pki.ca_cert)
    crl = write_crl(pki, [])
    mixed = tmp_path / "mixed.pem"
    mixed.write_bytes(crl.read_bytes() + pki.ca_cert.read_bytes())
    with pytest.raises(ConfigError, match="must not contain certificates"):
        server_context(cert=pki.server_cert, key=pki.server_key, ca=pki.ca_cert, crl=mixed)


def test_invalid_versions_raise_config_error(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    with pytest.raises(ConfigError, match="min_version"):
        server_context(
            cert=pki.server_cert,
            key=pki.server_key,
            ca=pki.ca_cert,
            min_version="1.1",  # type: ignore[arg-type]
        )
    with pytest.raises(ConfigError, match="below"):
        client_context(cert=None, key=None, ca=pki.ca_cert, min_version="1.3", max_version="1.2")
