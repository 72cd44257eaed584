"""Fixtures for the integration tests; the native-server harness lives in ``native_fixtures``."""

from hsm_fixtures import softhsm_fixture
from native_fixtures import native, native_factory, tls_material

__all__ = ["native", "native_factory", "softhsm_fixture", "tls_material"]
