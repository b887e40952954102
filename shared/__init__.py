"""detfleet shared."""
