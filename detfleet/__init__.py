"""detfleet detfleet."""
