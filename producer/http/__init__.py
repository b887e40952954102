"""The HTTP gateway (``detfleet gateway``): a producer that speaks HTTP to cameras and browsers."""
