"""Store adapters behind ``securebroker.core.ports.Store``."""
