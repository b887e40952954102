"""The broker seam: the only code that imports pika or aio-pika.

Everything above it speaks :class:`shared.schema.Envelope` and the errors of :mod:`shared.errors`.
``aio`` is the asyncio side (consumer, topology, tools), ``publishing`` the producer's confirm channel
(the blocking gateway API runs it on an event loop in a thread), ``quarantine`` the pika-based sweep that
moves aside messages aiormq cannot decode.
"""
