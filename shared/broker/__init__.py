"""The broker seam: the only code that imports pika or aio-pika.

Everything above it speaks :class:`shared.schema.Envelope` and the errors of :mod:`shared.errors`.
``aio`` is the asyncio side (consumer, CLI producer, topology); ``blocking`` the thread-side publisher
that gateway code embeds.
"""
