"""The offline auth tools: ``token mint``, ``policy validate`` and ``policy check``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from securebroker.authz.devkit import DevAuth, cert_thumbprint, ensure_dev_auth
from securebroker.authz.tokens import KeySource, TokenVerifier, VerifierSettings
from securebroker.cli import main
from securebroker.errors import AuthenticationError
from securebroker.tls import DevPki, ensure_dev_pki, peer_identity


@pytest.fixture
def dev(tmp_path: Path) -> tuple[DevPki, DevAuth]:
    pki = ensure_dev_pki(tmp_path / "certs")
    return pki, ensure_dev_auth(tmp_path / "certs", tmp_path / "home")


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


async def test_minted_token_verifies_and_is_bound(dev: tuple[DevPki, DevAuth]) -> None:
    pki, auth = dev
    cert = pki.clients["dev-client"][0]
    code, out = run(
        "token", "mint", "-s", "svc-orders", "--role", "writer", "--tenant", "acme",
        "--ttl", "120", "--bind-cert", str(cert), "--signing-key", str(auth.signing_key),
    )  # fmt: skip
    assert code == 0, out
    keys = KeySource(frozenset({"EdDSA"}), file=auth.jwks)
    await keys.start()
    verifier = TokenVerifier(
        VerifierSettings(
            issuer="securebroker-dev", audience="securebroker", algorithms=frozenset({"EdDSA"})
        ),
        keys,
    )
    der = _der(cert)
    p = await verifier.verify(out.strip(), peer_identity(der))
    assert (p.subject, p.roles, p.tenant) == ("svc-orders", {"writer"}, "acme")
    assert p.bound_thumbprint == cert_thumbprint(cert)
    other = peer_identity(_der(pki.clients["dev-admin"][0]))
    with pytest.raises(AuthenticationError):
        await verifier.verify(out.strip(), other)


def _der(cert: Path) -> bytes:
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    return x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


def test_mint_refuses_a_world_readable_key(dev: tuple[DevPki, DevAuth]) -> None:
    _, auth = dev
    auth.signing_key.chmod(0o644)
    code, out = run("token", "mint", "-s", "x", "--signing-key", str(auth.signing_key))
    assert code != 0
    assert "accessible by other users" in out
    assert "PRIVATE KEY" not in out


def test_mint_without_a_key_says_how_to_get_one(tmp_path: Path) -> None:
    code, out = run("token", "mint", "-s", "x", "--signing-key", str(tmp_path / "none.key"))
    assert code != 0 and "securebroker dev" in out


def test_policy_validate(dev: tuple[DevPki, DevAuth], tmp_path: Path) -> None:
    _, auth = dev
    code, out = run("policy", "validate", str(auth.policy))
    assert code == 0 and out.startswith("ok: 2 rule(s) from 1 file(s)")
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\n[[rules]]\nid = "r"\nactions = ["fly"]\ntopics = ["#"]\n')
    code, out = run("policy", "validate", str(bad))
    assert code != 0
    assert "bad.toml" in out and "actions" in out


def test_policy_check_explains_allow_and_deny(dev: tuple[DevPki, DevAuth]) -> None:
    _, auth = dev
    code, out = run(
        "policy", "check", "--policy", str(auth.policy), "--subject", "dev-client",
        "publish", "orders.eu",
    )  # fmt: skip
    assert code == 0, out
    assert out.startswith("ALLOW: allowed by rule 'dev-client-messaging'")
    code, out = run(
        "policy", "check", "--policy", str(auth.policy), "--subject", "dev-client", "--json",
        "admin", "orders.eu",
    )  # fmt: skip
    assert code == 1
    doc = json.loads(out)
    assert doc["allowed"] is False and doc["rule"] is None
    assert "no rule grants admin" in doc["reason"]
    assert {r["id"]: r["applies"] for r in doc["rules"]} == {
        "dev-client-messaging": False,
        "dev-admin-everything": False,
    }
