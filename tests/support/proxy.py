"""An asyncio TCP proxy a test owns, standing between a client and the shared broker.

It forwards bytes both ways and lets the test break the path without touching the broker:

- :meth:`TcpProxy.cut` aborts every open connection (a network failure; new ones are still accepted);
- :meth:`TcpProxy.pause` stops forwarding without closing anything, the way a broker under a memory or
  disk alarm stops reading: the client's writes pile up in socket buffers and no confirm comes back;
  :meth:`TcpProxy.resume` lets the held bytes through;
- ``refuse_new = True`` closes new connections at once (a broker that is down).

Use it as ``async with TcpProxy(port=5672) as proxy: url = proxy.amqp_url(base_url)``.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

_CHUNK = 65536


class _Pipe:
    """One client connection and its upstream twin."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.writers = (client, upstream)
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()


class TcpProxy:
    def __init__(self, host: str = "127.0.0.1", port: int = 5672, listen_host: str = "127.0.0.1") -> None:
        self.target = (host, port)
        self.listen_host = listen_host
        self.refuse_new = False
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._accepts = asyncio.Condition()

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)
        return self

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("proxy not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def amqp_url(self, url: str) -> str:
        """``url`` (credentials, vhost and query kept) pointed at this proxy instead of the broker."""
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = (
            f"{credentials}@{self.listen_host}:{self.port}"
            if credentials
            else f"{self.listen_host}:{self.port}"
        )
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @property
    def open_connections(self) -> int:
        return len(self._pipes)

    @property
    def paused(self) -> bool:
        return not self._flowing.is_set()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> int:
        """Abort every open connection (both sides see a reset); returns how many there were."""
        pipes = list(self._pipes)
        for pipe in pipes:
            pipe.abort()
        return len(pipes)

    async def wait_for_accepted(self, count: int, timeout: float = 15.0) -> None:
        """Until ``count`` connections have been accepted since start (e.g. a client reconnected)."""
        async with self._accepts:
            await asyncio.wait_for(self._accepts.wait_for(lambda: self.accepted >= count), timeout)

    async def close(self) -> None:
        self.resume()
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        tasks = [task for pipe in self._pipes for task in pipe.tasks]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pipes.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self.refuse_new:
            client_writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        pipe = _Pipe(client_writer, upstream_writer)
        self._pipes.add(pipe)
        pipe.tasks = [
            asyncio.create_task(self._pump(client_reader, upstream_writer)),
            asyncio.create_task(self._pump(upstream_reader, client_writer)),
        ]
        async with self._accepts:
            self.accepted += 1
            self._accepts.notify_all()
        await asyncio.gather(*pipe.tasks, return_exceptions=True)
        pipe.abort()
        self._pipes.discard(pipe)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                # Waiting before the read as well as before the write: a paused proxy stops reading, so
                # the sender's socket buffers fill up just as with a broker that blocked the connection.
                await self._flowing.wait()
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
