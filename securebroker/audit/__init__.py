"""Tamper-evident audit trail: records, hash chains, signed checkpoints, offline verification."""
