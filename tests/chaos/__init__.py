"""Chaos soak, overload and fuzz harnesses: they start private servers and own their life."""
