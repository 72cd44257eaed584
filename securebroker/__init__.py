"""securebroker: a secure, transactional message broker on PostgreSQL."""

__version__ = "0.1.0"
