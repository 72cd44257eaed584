"""Transport security: mutual-TLS contexts, the development PKI and peer identities."""

from securebroker.tls.context import (
    TlsVersionName,
    client_context,
    identity_from_ssl_object,
    server_context,
)
from securebroker.tls.pki import (
    SPIFFE_TRUST_DOMAIN,
    DevPki,
    PeerIdentity,
    ensure_dev_pki,
    issue_client_cert,
    peer_identity,
    write_crl,
)

__all__ = [
    "SPIFFE_TRUST_DOMAIN",
    "DevPki",
    "PeerIdentity",
    "TlsVersionName",
    "client_context",
    "ensure_dev_pki",
    "identity_from_ssl_object",
    "issue_client_cert",
    "peer_identity",
    "server_context",
    "write_crl",
]
