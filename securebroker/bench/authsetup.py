"""Authentication and authorization for the benchmarked broker: ``--auth on`` or ``off``.

``on`` is how a production broker runs: every connection presents an Ed25519-signed JWT bound to
its client certificate, and a 50-rule policy (deny rules included) decides every publish,
consume and settle. ``off`` is the cheapest configuration the broker can be given: no tokens,
one rule allowing every certificate everything. The difference between the two runs is the
cost of ACLs (issue #5 asks for at most 5%).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from securebroker.authz.devkit import cert_thumbprint, public_jwk
from securebroker.authz.tokens import mint_token
from securebroker.secrets import write_private

ISSUER = "https://idp.bench.invalid"
AUDIENCE = "securebroker-bench"
SUBJECT = "bench-client"


def _realistic_policy() -> str:
    """Rules for 24 other services and roles, deny rules, then the bench client's grant last,
    so a decision walks most of the policy."""
    lines = ["version = 1", ""]
    for i in range(24):
        lines += [
            "[[rules]]",
            f'id = "svc-{i}-publish"',
            'actions = ["publish"]',
            f'topics = ["svc{i}.#", "shared.*.svc{i}"]',
            f'subjects = ["svc-{i}"]',
            "",
            "[[rules]]",
            f'id = "role-{i}-consume"',
            'actions = ["consume"]',
            f'topics = ["svc{i}.*.events", "#.svc{i}.audit"]',
            f'roles = ["reader-{i}"]',
            f'tenants = ["tenant-{i % 5}"]',
            "",
        ]
    lines += [
        "[[rules]]",
        'id = "no-internal"',
        'effect = "deny"',
        'actions = ["publish", "consume", "admin"]',
        'topics = ["#.internal.#"]',
        "any_principal = true",
        "",
        "[[rules]]",
        'id = "bench-client"',
        'actions = ["publish", "consume", "admin"]',
        'topics = ["bench.#"]',
        f'subjects = ["{SUBJECT}"]',
        "",
    ]
    return "\n".join(lines)


ALLOW_ALL = """version = 1

[[rules]]
id = "everyone-everything"
actions = ["publish", "consume", "admin"]
topics = ["#"]
any_principal = true
"""


def configure(workdir: Path, client_cert: Path, mode: str) -> tuple[str, str | None]:
    """The ``[auth]`` section for the broker's config, and the token clients present."""
    policy = workdir / "policy"
    policy.mkdir(parents=True, exist_ok=True)
    if mode == "off":
        (policy / "allow-all.toml").write_text(ALLOW_ALL)
        return f'[auth]\npolicy = "{policy}"\nrequire_token = false\n', None
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(workdir / "jwt-signing.key", pem)
    jwk = public_jwk(key.public_key())
    (workdir / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    (policy / "services.toml").write_text(_realistic_policy())
    token = mint_token(
        pem,
        kid=jwk["kid"],
        subject=SUBJECT,
        issuer=ISSUER,
        audience=AUDIENCE,
        lifetime=timedelta(hours=6),
        roles=["reader-3", "reader-7"],
        tenant="tenant-2",
        bind_thumbprint=cert_thumbprint(client_cert),
    )
    section = (
        f'[auth]\npolicy = "{policy}"\njwks_file = "{workdir / "jwks.json"}"\n'
        f'issuer = "{ISSUER}"\naudience = "{AUDIENCE}"\nrequire_token = true\n'
        "require_bound_token = true\n"
    )
    return section, token
