"""The hall's network as the chaos run sees it: a TCP proxy between the devices and the broker
that can cut or stall one device's link, or every link at once.

Each device gets a listening port of its own on 127.0.0.1 (its config names that port instead
of the broker's), so a fault hits exactly one device, as a pulled cable or a Wi-Fi drop
would. A link is in one of three states:

- up: bytes flow both ways, unchanged;
- down ("drop"): open connections are aborted (the device reads a reset) and new ones are
  closed as soon as they are accepted, until the link is healed;
- stalled: connections stay open but no byte moves either way until the link is healed --
  the device notices only through its own keepalive, as with a radio that hangs.

The proxy holds at most one read chunk per direction per connection while stalled; the rest
waits in the kernel's socket buffers, so memory stays bounded however long a stall lasts.
Everything runs on the caller's asyncio loop.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field

from hub import PingjiaError

CHUNK = 16384


class ProxyError(PingjiaError):
    """The proxy could not listen or was asked about a device it does not carry."""


@dataclass
class LinkCounters:
    accepted: int = 0  # connections the device opened through the proxy
    refused: int = 0  # connections closed at once because the link was down
    upstream_failed: int = 0  # the broker did not take the connection
    aborted: int = 0  # open connections cut by a drop
    drops: int = 0  # times the link was taken down
    stalls: int = 0  # times the link was stalled
    bytes_up: int = 0  # device -> broker
    bytes_down: int = 0  # broker -> device


@dataclass(eq=False)  # identity: pipes live in a set
class _Pipe:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list = field(default_factory=list)

    def abort(self, reset: bool = False) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None and writer.transport is not None:
                if reset:
                    _reset(writer)
                writer.transport.abort()
        for task in self.tasks:
            task.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    # Linger 0: closing sends a TCP reset, so the peer's next read fails at once, as when
    # a link really goes away mid-stream (a plain close would look like an orderly end).
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


class Link:
    """One device's path to the broker."""

    def __init__(self, device_id: str, upstream: tuple[str, int]):
        self.device_id = device_id
        self.upstream = upstream
        self.port = 0
        self.state = "up"
        self.counters = LinkCounters()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._pipes: set[_Pipe] = set()
        self._server: asyncio.base_events.Server | None = None

    async def listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def open_connections(self) -> int:
        return len(self._pipes)

    def drop(self) -> None:
        if self.state != "down":
            self.counters.drops += 1
        self.state = "down"
        self._flowing.set()  # stalled pumps wake up and find their sockets gone
        for pipe in list(self._pipes):
            self.counters.aborted += 1
            pipe.abort(reset=True)
        self._pipes.clear()

    def stall(self) -> None:
        if self.state == "down":
            return  # nothing flows anyway
        if self.state != "stalled":
            self.counters.stalls += 1
        self.state = "stalled"
        self._flowing.clear()

    def heal(self) -> None:
        self.state = "up"
        self._flowing.set()

    async def close(self) -> None:
        self.state = "down"  # a connection accepted from now on is refused
        self._flowing.set()
        for pipe in list(self._pipes):
            pipe.abort()
        self._pipes.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counters.accepted += 1
        if self.state == "down":
            self.counters.refused += 1
            _reset(writer)
            writer.transport.abort()
            return
        pipe = _Pipe(writer)
        self._pipes.add(pipe)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                # The broker is down (a restart under way): the device sees its connection
                # closed and retries, as it would against the broker itself.
                self.counters.upstream_failed += 1
                _reset(writer)
                writer.transport.abort()
                return
            pipe.upstream = up_writer
            if pipe not in self._pipes:  # dropped while connecting
                pipe.abort(reset=True)
                return
            pipe.tasks = [asyncio.ensure_future(self._pump(reader, up_writer, True)),
                          asyncio.ensure_future(self._pump(up_reader, writer, False))]
            # When either side ends, the other goes too: no half-open connections.
            await asyncio.wait(pipe.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._pipes.discard(pipe)
            pipe.abort()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
        try:
            while True:
                data = await src.read(CHUNK)
                if not data:
                    return
                # A stall holds this one chunk; further bytes wait in the kernel.
                await self._flowing.wait()
                if self.state == "down":
                    return
                dst.write(data)
                await dst.drain()
                if up:
                    self.counters.bytes_up += len(data)
                else:
                    self.counters.bytes_down += len(data)
        except (ConnectionError, OSError):
            return


class NetworkProxy:
    """Links for a set of devices, all forwarding to one broker address."""

    def __init__(self, upstream_host: str, upstream_port: int):
        self.upstream = (upstream_host, upstream_port)
        self.links: dict[str, Link] = {}

    async def add(self, device_id: str) -> int:
        """Open a link for a device; returns the port its config must name."""
        if device_id in self.links:
            return self.links[device_id].port
        link = Link(device_id, self.upstream)
        try:
            await link.listen()
        except OSError as exc:
            raise ProxyError("cannot listen for %s: %s" % (device_id, exc.strerror))
        self.links[device_id] = link
        return link.port

    def link(self, device_id: str) -> Link:
        try:
            return self.links[device_id]
        except KeyError:
            raise ProxyError("no link for device %s" % device_id) from None

    def drop(self, device_id: str | None = None) -> None:
        """Take one device's link (None: every link) down."""
        for link in self._targets(device_id):
            link.drop()

    def stall(self, device_id: str | None = None) -> None:
        for link in self._targets(device_id):
            link.stall()

    def heal(self, device_id: str | None = None) -> None:
        for link in self._targets(device_id):
            link.heal()

    def _targets(self, device_id: str | None) -> list[Link]:
        return list(self.links.values()) if device_id is None else [self.link(device_id)]

    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for link in self.links.values():
            for name, value in vars(link.counters).items():
                total[name] = total.get(name, 0) + value
        return total

    async def close(self) -> None:
        for link in self.links.values():
            await link.close()
