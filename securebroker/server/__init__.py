"""The running broker: front doors (listeners), authentication seam, admin operations."""
