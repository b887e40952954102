"""detfleet producer."""
