"""detfleet consumer."""
