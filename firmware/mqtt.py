# MQTT 3.1.1 client for the counter device: asyncio, QoS 0 and 1, bounded memory.
# The same file runs on MicroPython's asyncio (the device imports it as `mqtt`) and on
# CPython's asyncio. The top half is the packet encoders and the PUBLISH decoder (byte-exact,
# no socket); the bottom half is MQTTClient, which keeps one link to the broker alive for
# ever and reads the broker's other packets itself.
#
# Deliberately missing (docs/mqtt.md): no outgoing queue and no persistence -- the device's
# vote journal is the queue and the hub's application-level ack is what trims it -- and no
# QoS 2. A QoS 1 publish whose link drops before PUBACK raises OSError; the caller retries
# later from its own durable copy, so the hub may see duplicates, which it absorbs because
# a vote's identity is (device, seq).
#
# Written for a 64 KB heap: every module-level name, function, method, attribute and long
# string costs the device heap, so helpers used once are inlined, packet types are
# compile-time constants, the broker's half of the protocol lives in the tests, and the
# only buffer is the receive buffer allocated once in the constructor.
import asyncio
import errno
from random import getrandbits

try:
    from micropython import const
except ImportError:  # CPython
    const = int  # type: ignore[assignment]  # every constant here is an int

try:
    from time import ticks_diff, ticks_ms
except ImportError:  # CPython has no ticks; a monotonic clock in ms does the same job here
    from time import monotonic as _monotonic  # type: ignore[attr-defined]

    def ticks_ms():
        return int(_monotonic() * 1000)

    def ticks_diff(a, b):  # type: ignore[no-redef]
        return a - b

try:
    _sleep_ms = asyncio.sleep_ms  # MicroPython: no float (a heap object) per sleep
    _MICROPYTHON = True
except AttributeError:  # CPython
    _MICROPYTHON = False

    def _sleep_ms(ms):
        return asyncio.sleep(ms / 1000)


# Fixed-header first bytes. SUBSCRIBE's low nibble 0010 is required by the spec (3.8.1).
_CONNECT = const(0x10)
_CONNACK = const(0x20)
_PUBLISH = const(0x30)
_PUBACK = const(0x40)
_SUBSCRIBE = const(0x82)
_SUBACK = const(0x90)
_PINGRESP = const(0xD0)
_MAX_REMAINING = const(268435455)  # four 7-bit groups: the largest remaining length there is
_DUP = const(0x08)
_RETAIN = const(0x01)
_BACKOFF_FIRST_MS = const(500)
_MIN_PACKET = const(64)
_POLL_MS = const(20)  # how often a waiting task looks at the flags it waits for
_POLL_MIN_MS = const(5)  # a link's pauses between polls of its socket: 5 ms ...
_POLL_MAX_MS = const(100)  # ... growing to 100 ms while it is quiet (Link)
_IDLE_MS = const(100)  # run() looks at a live link this often (keepalive, faults)
# SUBACK's return code for a refused subscription: what subscribe() then returns.
SUB_REFUSED = const(0x80)


class MQTTError(ValueError):
    """A caller mistake: a bad topic, QoS, packet id, client id or argument."""


class MalformedPacket(MQTTError):
    """Bytes that are not a well-formed MQTT 3.1.1 packet."""


# ---------------------------------------------------------------------------------------
# Encoders return bytes and raise MQTTError naming the bad argument; decode_publish takes
# the body (what follows the remaining length) and raises MalformedPacket.

def encode_length(value):
    """The remaining-length varint: 7 bits a byte, low group first, top bit = more."""
    if value < 0 or value > _MAX_REMAINING:
        raise MQTTError("length")  # past 268435455
    out = bytearray()
    while True:
        digit = value & 0x7F
        value >>= 7
        if not value:
            out.append(digit)
            return bytes(out)
        out.append(digit | 0x80)


def _raw(value):
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise MQTTError("payload")  # bytes(5) would quietly send 5 zero bytes


def _string(value):
    # A length-prefixed field; 65535 bytes at most.
    raw = _raw(value)
    if len(raw) > 65535:
        raise MQTTError("length")  # a field over 65535 bytes
    return bytes((len(raw) >> 8, len(raw) & 0xFF)) + raw


def _pid16(pid):
    # A packet id (1..65535) as its two bytes.
    if not isinstance(pid, int) or pid < 1 or pid > 65535:
        raise MQTTError("pid")  # not 1..65535
    return bytes((pid >> 8, pid & 0xFF))


def check_topic(topic):
    """A topic to publish to: non-empty, no wildcards, no NUL, at most 65535 bytes."""
    if (not isinstance(topic, str) or not topic or "+" in topic or "#" in topic
            or "\x00" in topic):
        raise MQTTError("topic")
    return topic


def check_filter(topic):
    """A topic filter to subscribe to: '+' fills a whole level, '#' only as the last level."""
    if not isinstance(topic, str) or not topic or "\x00" in topic:
        raise MQTTError("topic")
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if (("#" in level and (level != "#" or i != len(levels) - 1))
                or ("+" in level and level != "+")):
            raise MQTTError("topic")
    return topic


def connect_packet(client_id, keepalive=30, clean_session=True, will=None, user=None,
                   password=None):
    """CONNECT. will = (topic, payload, qos, retain)."""
    if not isinstance(keepalive, int) or keepalive < 0 or keepalive > 65535:
        raise MQTTError("keepalive")
    if not client_id and not clean_session:
        # 3.1.3.1: a broker rejects an empty client id with a persistent session
        raise MQTTError("client_id")
    if password is not None and user is None:
        raise MQTTError("user")  # MQTT 3.1.1: no password without a user name
    flags = 0x02 if clean_session else 0
    payload = _string(client_id)
    if will is not None:
        w_topic, w_payload, w_qos, w_retain = will
        check_topic(w_topic)
        if w_qos != 0 and w_qos != 1:
            raise MQTTError("qos")
        flags |= 0x04 | (w_qos << 3) | (0x20 if w_retain else 0)
        payload += _string(w_topic) + _string(w_payload)
    if user is not None:
        flags |= 0x80
        payload += _string(user)
    if password is not None:
        flags |= 0x40
        payload += _string(password)
    body = b"\x00\x04MQTT\x04" + bytes((flags, keepalive >> 8, keepalive & 0xFF)) + payload
    return bytes((_CONNECT,)) + encode_length(len(body)) + body


def publish_header(topic, payload_len, qos=0, retain=False, dup=False, pid=0):
    """Everything of a PUBLISH before the payload, so a payload is sent without a copy."""
    check_topic(topic)
    var = _string(topic)
    if qos == 1:
        var += _pid16(pid)
    elif qos != 0:
        raise MQTTError("qos")
    elif pid or dup:
        raise MQTTError("pid")  # a qos 0 publish has no packet id and no DUP
    first = _PUBLISH | (qos << 1) | (_DUP if dup else 0) | (_RETAIN if retain else 0)
    return bytes((first,)) + encode_length(len(var) + payload_len) + var


def decode_publish(first, body, copy=True):
    """PUBLISH -> (topic, payload, qos, retain, dup, pid); pid is 0 for qos 0.

    The payload is bytes, or with copy=False a slice of body itself (no copy)."""
    qos = (first >> 1) & 3
    size = len(body)
    start = 2 + ((body[0] << 8) | body[1] if size >= 2 else size)
    pos = start + (2 if qos else 0)
    topic = None
    if first & 0xF0 == _PUBLISH and qos != 3 and pos <= size:
        try:
            topic = bytes(body[2:start]).decode()
        except UnicodeError:
            pass
    if not topic or "+" in topic or "#" in topic:
        # bad flags, a header running past the end, a topic that is not UTF-8 or not one
        raise MalformedPacket("topic")
    pid = 0
    if qos:
        pid = (body[start] << 8) | body[start + 1]
        if not pid:
            raise MalformedPacket("pid")  # packet id 0
    payload = body[pos:]
    return (topic, bytes(payload) if copy else payload, qos, bool(first & _RETAIN),
            bool(first & _DUP), pid)


def _why(exc):
    return exc if isinstance(exc, str) else repr(exc)


# ---------------------------------------------------------------------------------------
# The link on MicroPython: a non-blocking socket the client polls. It does for the client
# what asyncio's streams do (readinto, write, drain, close), without loading that module
# and its classes onto the device's heap; the simulated board's control channel uses it
# too. (CPython, where the tests also run the client, uses asyncio.open_connection.)

class Link:
    """A non-blocking socket: readinto() waits for data by polling it.

    The pause between polls grows from 5 ms to 100 ms while nothing arrives and is short
    again once something does or something is written (an answer is then due soon): quick
    when talking, and an idle device wakes ten times a second, not two hundred."""

    def __init__(self, sock):
        self.s = sock
        self._out = []  # what write() queued for drain()
        self.pause = _POLL_MIN_MS  # the next pause between polls

    async def readinto(self, mv):
        while True:
            n = self.s.readinto(mv)  # None: nothing yet; 0: closed by the peer
            if n is not None:
                self.pause = _POLL_MIN_MS
                return n
            await _sleep_ms(self.pause)
            self.pause = min(self.pause * 2, _POLL_MAX_MS)

    def write(self, data):
        self._out.append(data)
        self.pause = _POLL_MIN_MS

    async def drain(self):
        out = self._out
        while out:
            n = self.s.write(out[0])  # None: the socket is full (or still connecting)
            if n is None:
                await _sleep_ms(_POLL_MIN_MS)
            elif n < len(out[0]):
                out[0] = memoryview(out[0])[n:]
            else:
                out.pop(0)

    def close(self):
        self._out = []
        self.s.close()


async def open_link(host, port, ssl=None):
    """(link, link) to host:port, as asyncio.open_connection gives (reader, writer); with
    ssl, an SSLContext, TLS on top (its handshake runs in the first reads and writes)."""
    import socket

    ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    sock = socket.socket(ai[0], ai[1], ai[2])
    sock.setblocking(False)
    try:
        sock.connect(ai[-1])
    except OSError as exc:
        if exc.errno != errno.EINPROGRESS:
            sock.close()
            raise
    if ssl is not None:
        sock = ssl.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        sock.setblocking(False)
    link = Link(sock)
    return link, link


# ---------------------------------------------------------------------------------------
# The client.

class MQTTClient:
    """Keeps one MQTT link alive; publish/subscribe ride on it while it is up.

    Link faults surface as OSError from publish/subscribe and are handled by run(), which
    reconnects with capped exponential backoff and jitter. Caller mistakes raise MQTTError.

    With borrow=True on_message gets the payload as a memoryview into the receive buffer,
    valid during the call only: no copy of every downlink on a small heap.

    A PUBLISH bigger than max_packet is dropped and counted, unless spool(topic, length)
    returns a sink for it: the payload is then written to sink.write() piece by piece as it
    arrives, and on_message(topic, sink, retained) gets the sink instead of the payload.

    The client waits by polling its own flags every few tens of milliseconds instead of
    using asyncio's Event, Lock and wait_for: on the device those would load three more
    modules and make a task per timed wait, for no gain at this pace (a packet or two a
    second). Its tasks: run() (connecting, keepalive, backoff) and one receiver per link.
    """

    def __init__(self, client_id, server, port=1883, user=None, password=None, keepalive=30,
                 clean_session=False, will=None, ssl=None, max_packet=4096, on_message=None,
                 on_connect=None, open_connection=None, backoff_max_ms=30000,
                 ack_timeout_ms=10000, spool=None, borrow=False):
        if max_packet < _MIN_PACKET:
            raise MQTTError("max_packet")
        # Built once: it is the same bytes on every connect, and bad arguments fail here.
        self._connect_pkt = connect_packet(client_id, keepalive, clean_session, will, user,
                                           password)
        self.server = server
        self.port = port
        self._ssl = ssl
        self._open = open_connection
        self._on_message = on_message
        self._on_connect = on_connect
        self._spool = spool  # spool(topic, length) -> sink with write(), or None: drop
        self._borrow = borrow  # on_message gets a view into the buffer, not a copy
        self._ka_ms = keepalive * 1000
        self._backoff_max = backoff_max_ms
        self._ack_ms = ack_timeout_ms
        # The one receive buffer: allocated here, reused for every incoming packet.
        self._mv = memoryview(bytearray(max_packet))
        self._mv1 = self._mv[:1]
        self._reader = None
        self._writer = None
        self._rx_task = None           # the receiver of the current link
        self._gen = 0                  # link generation: a fault on an old link is ignored
        self._link_ok = False          # socket open and not failed
        self._connected = False        # CONNACK accepted and link not failed
        self._stop = False             # disconnect() was called: run() returns
        self._busy = False             # a qos1 publish or a subscribe awaits its ack
        self._writing = False          # a packet is being written (whole packets only)
        self._pid = 0
        self._wait = 0                 # (packet type << 16) | pid of the ack awaited
        self._ack_code = -1            # its return code once it arrived, else -1
        self._last_rx = self._last_tx = self._last_ping = ticks_ms()
        self.session_present = False
        self.last_fault = None
        self.reconnects = 0            # successful connects after the first
        self.connect_failures = 0      # attempts that never reached an accepted CONNACK
        self.dropped_incoming = 0      # incoming packets too big or malformed, discarded
        self.pub_retries = 0           # qos1 publishes resent with DUP
        self.callback_errors = 0       # exceptions raised by on_message

    # -- public API ----------------------------------------------------------------------

    def isconnected(self):
        return self._connected

    async def connected(self):
        while not self._connected:
            await _sleep_ms(_IDLE_MS)

    async def run(self):
        """Connect, and after any link fault reconnect, until disconnect() is called."""
        self._stop = False
        attempt = 0
        ever = False
        try:
            while not self._stop:
                try:
                    await self._open_and_connect()
                except Exception as exc:  # noqa: BLE001
                    # The arguments were checked in __init__, so whatever fails here is
                    # the link: refused, timed out, a bad CONNACK, or a TLS error
                    # (MicroPython's TLS raises ValueError, not OSError). Counted; retried.
                    self.connect_failures += 1
                    self.last_fault = _why(exc)
                    self._end_link()
                else:
                    up_at = ticks_ms()
                    if ever:
                        self.reconnects += 1
                    ever = True
                    gen = self._gen
                    try:
                        # While the link lives: on_connect, then the keepalive duty.
                        if self._on_connect is not None:
                            try:
                                await self._on_connect(self)
                            except OSError as exc:  # the link broke while re-subscribing
                                self._fail(exc, gen)
                        ka = self._ka_ms
                        half = ka // 2
                        tick = min(max(ka // 8, 50), 1000)
                        last = ticks_ms()
                        while self._link_ok and gen == self._gen:
                            await _sleep_ms(min(tick, _IDLE_MS))
                            now = ticks_ms()
                            if not ka or ticks_diff(now, last) < tick:
                                continue
                            last = now
                            silent = ticks_diff(now, self._last_rx)
                            if silent >= ka + half:
                                self._fail("broker silent for 1.5 x keepalive", gen)
                            # Ping when we have been quiet (the broker needs a packet within
                            # keepalive) or the broker has (a ping forces an answer that
                            # proves the link lives).
                            elif (ticks_diff(now, self._last_tx) >= half
                                  or (silent >= half
                                      and ticks_diff(now, self._last_ping) >= half)):
                                self._last_ping = now
                                try:
                                    await self._send(b"\xc0\x00", None, gen)  # PINGREQ
                                except OSError:
                                    pass  # _send has failed the link
                    finally:
                        self._end_link()
                    # A link that stayed up a while was a real recovery; one that died at
                    # once (a flapping broker, a client-id fight) keeps growing the backoff.
                    if ticks_diff(ticks_ms(), up_at) >= max(self._ka_ms, 1000):
                        attempt = 0
                if self._stop:
                    break
                delay = _BACKOFF_FIRST_MS << min(attempt, 10)
                if delay > self._backoff_max:
                    delay = self._backoff_max
                # Jitter into [delay/2, delay]: a hall of devices that lost the broker
                # together must not all come back in the same millisecond.
                half = delay // 2
                delay = half + ((delay - half) * getrandbits(8) >> 8)
                start = ticks_ms()
                while not self._stop and ticks_diff(ticks_ms(), start) < delay:
                    await _sleep_ms(_IDLE_MS)
                attempt += 1
        finally:  # also when the caller cancels run(): never leave a socket behind
            self._end_link()

    async def publish(self, topic, payload, qos=0, retain=False):
        """Send one message. qos 1 returns once PUBACKed; OSError if the link drops first."""
        check_topic(topic)
        payload = _raw(payload)
        if not qos:
            if not self._connected:
                raise OSError(errno.ENOTCONN)
            await self._send(publish_header(topic, len(payload), 0, retain), payload,
                             self._gen)
            return
        if qos != 1:
            raise MQTTError("qos")
        gen = await self._take()
        try:
            self._pid = pid = self._pid % 65535 + 1
            head = publish_header(topic, len(payload), 1, retain, False, pid)
            self._wait = (_PUBACK << 16) | pid
            await self._send(head, payload, gen)
            while not await self._wait_ack(gen):
                # No PUBACK in time on a live link: resend the same pid with DUP so the
                # broker knows it may be a repeat.
                self.pub_retries += 1
                head = bytearray(head)
                head[0] |= _DUP
                await self._send(head, payload, gen)
        finally:
            self._wait = 0
            self._busy = False

    async def subscribe(self, topic, qos=1):
        """Subscribe to one filter; returns the granted qos, or SUB_REFUSED (0x80)."""
        body = _string(check_filter(topic))
        if qos != 0 and qos != 1:
            raise MQTTError("qos")
        body += bytes((qos,))
        gen = await self._take()
        try:
            self._pid = pid = self._pid % 65535 + 1
            self._wait = (_SUBACK << 16) | pid
            body = _pid16(pid) + body
            await self._send(bytes((_SUBSCRIBE,)) + encode_length(len(body)) + body, None, gen)
            if not await self._wait_ack(gen):
                # SUBSCRIBE cannot be resent with DUP; a broker this slow is as good as gone.
                exc = OSError(errno.ETIMEDOUT)  # no SUBACK
                self._fail(exc, gen)
                raise exc
            return self._ack_code
        finally:
            self._wait = 0
            self._busy = False

    async def disconnect(self):
        """Say goodbye (so the broker drops the will), close, and make run() return."""
        self._stop = True
        gen = self._gen
        if self._link_ok:
            try:
                await self._send(b"\xe0\x00", None, gen)  # DISCONNECT
            except OSError:
                pass
        self._fail("disconnect", gen)
        self._end_link()

    # -- link ------------------------------------------------------------------------------

    async def _take(self):
        # One qos1 publish or subscribe at a time awaits its ack; returns the link it uses.
        while self._busy:
            await _sleep_ms(_POLL_MS)
        if not self._connected:
            raise OSError(errno.ENOTCONN)
        self._busy = True
        self._ack_code = -1
        return self._gen

    async def _within(self, coro):
        # coro's result, or OSError once ack_timeout_ms passed (the coroutine is cancelled).
        task = asyncio.create_task(coro)
        start = ticks_ms()
        while not task.done():
            if ticks_diff(ticks_ms(), start) >= self._ack_ms:
                task.cancel()
                raise OSError(errno.ETIMEDOUT)
            await _sleep_ms(_POLL_MS)
        return await task

    async def _open_and_connect(self):
        self._gen += 1
        gen = self._gen
        opener = self._open or (open_link if _MICROPYTHON else asyncio.open_connection)
        if self._ssl is None:
            link = opener(self.server, self.port)
        else:
            link = opener(self.server, self.port, ssl=self._ssl)
        self._reader, self._writer = await self._within(link)
        self._link_ok = True
        self._last_rx = self._last_tx = self._last_ping = ticks_ms()
        # Under the timeout too: a non-blocking connect to a host that never answers (or a
        # TLS handshake that stalls) shows only as writes that never go through.
        await self._within(self._send(self._connect_pkt, None, gen))
        body = self._mv[:2]
        if await self._within(self._read_fixed_header()) != (_CONNACK, 2):
            raise MalformedPacket()  # not a CONNACK
        await self._within(self._fill(body))
        if body[0] & 0xFE:  # only the session-present bit may be set
            raise MalformedPacket()  # a CONNACK with reserved bits set
        self.session_present = bool(body[0])
        if body[1]:
            raise OSError(errno.ECONNREFUSED, "CONNACK refused, code %d" % body[1])
        self._connected = True
        self._rx_task = asyncio.create_task(self._rx_loop(gen))

    def _fail(self, why, gen):
        # Every link fault from every task ends here, once per link.
        if gen != self._gen or not self._link_ok:
            return
        self._link_ok = False
        self._connected = False
        self.last_fault = _why(why)

    def _end_link(self):
        if self._rx_task is not None:
            self._rx_task.cancel()
            self._rx_task = None
        self._link_ok = False
        self._connected = False
        writer = self._writer
        self._reader = self._writer = None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # closing a broken socket may complain; it is closed anyway
                pass

    async def _send(self, head, tail, gen):
        while self._writing:
            await _sleep_ms(_POLL_MS // 4)
        writer = self._writer
        if writer is None or not self._link_ok or gen != self._gen:
            raise OSError(errno.ENOTCONN)
        self._writing = True
        try:
            writer.write(head)
            if tail:
                writer.write(tail)
            await writer.drain()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, gen)
            if isinstance(exc, OSError):
                raise
            # e.g. a TLS error, a ValueError on MicroPython: to the caller it is the link
            raise OSError(errno.ECONNRESET, _why(exc))
        finally:
            self._writing = False
        self._last_tx = ticks_ms()

    async def _wait_ack(self, gen):
        """True once the awaited ack arrived; False on timeout; OSError if the link failed."""
        start = ticks_ms()
        while (self._ack_code < 0 and self._link_ok and gen == self._gen
               and ticks_diff(ticks_ms(), start) < self._ack_ms):
            await _sleep_ms(_POLL_MS // 4)
        if self._ack_code >= 0:
            return True
        if gen != self._gen or not self._connected:
            raise OSError(errno.ECONNRESET)  # the link went before the ack came
        return False

    # -- receiving ---------------------------------------------------------------------------

    async def _fill(self, mv):
        """Fill the memoryview mv from the link completely, or raise OSError."""
        want = len(mv)
        got = 0
        reader = self._reader
        while got < want:
            if reader is None:
                raise OSError(errno.ENOTCONN)
            if hasattr(reader, "readinto"):
                # MicroPython streams read straight into our buffer.
                n = await reader.readinto(mv[got:] if got else mv)
                if n is None:  # spurious wake-up of a non-blocking socket
                    continue
            else:  # CPython's only hand out bytes
                chunk = await reader.read(want - got)
                n = len(chunk)
                mv[got:got + n] = chunk
            if not n:
                raise OSError(errno.ECONNRESET)  # the broker closed the link
            got += n
            self._last_rx = ticks_ms()

    async def _read_fixed_header(self):
        mv1 = self._mv1
        await self._fill(mv1)
        first = mv1[0]
        length = 0
        for i in range(4):
            await self._fill(mv1)
            digit = mv1[0]
            length |= (digit & 0x7F) << (7 * i)
            if not digit & 0x80:
                return first, length
        # Without a length the stream cannot be re-framed: only a new link recovers.
        self.dropped_incoming += 1
        raise OSError(errno.EIO)  # a remaining length over 4 bytes

    async def _rx_loop(self, gen):
        buf = self._mv
        size = len(buf)
        try:
            while True:
                first, length = await self._read_fixed_header()
                kind = first & 0xF0
                if length > size:
                    # Too big for the buffer: read it through the buffer in chunks. A PUBLISH
                    # goes to the spool the caller gave for its topic (a file, say), and is
                    # delivered as that sink once whole; anything else is forgotten, counted.
                    # A qos1 PUBLISH is PUBACKed either way, or the broker would redeliver
                    # it after every reconnect for ever.
                    pid = 0
                    sink = topic = None
                    left = length
                    while left:
                        chunk = min(left, size)
                        await self._fill(self._mv[:chunk])
                        part = 0
                        if left == length and kind == _PUBLISH and first & 0x06 != 0x06:
                            topic_len = (buf[0] << 8) | buf[1]
                            part = topic_len + (4 if first & 0x06 else 2)
                            if part <= chunk:
                                if first & 0x06:
                                    pid = (buf[part - 2] << 8) | buf[part - 1]
                                if self._spool is not None:
                                    try:
                                        topic = bytes(buf[2:2 + topic_len]).decode()
                                        sink = self._spool(topic, length - part)
                                    except Exception:  # not UTF-8, or the caller's fault
                                        sink = None
                            else:
                                part = 0
                        if sink is not None:
                            try:
                                sink.write(self._mv[part:chunk])
                            except Exception:  # the sink failed (a flash error): drop it
                                sink = None
                        left -= chunk
                    if sink is None:
                        self.dropped_incoming += 1
                    elif self._on_message is not None:
                        try:
                            self._on_message(topic, sink, bool(first & _RETAIN))
                        except Exception:  # the app's fault, not the link's: count, go on
                            self.callback_errors += 1
                    sink = None
                    if pid:
                        await self._send(bytes((_PUBACK, 2, pid >> 8, pid & 0xFF)), None, gen)
                    continue
                body = self._mv[:length]
                await self._fill(body)
                try:
                    if kind == _PUBLISH:
                        topic, payload, qos, retain, _, pid = decode_publish(
                            first, body, not self._borrow)
                        if qos == 2:  # we never ask for qos 2, and cannot honour its handshake
                            raise MalformedPacket("qos")  # 2: never asked for
                        if self._on_message is not None:
                            try:
                                self._on_message(topic, payload, retain)
                            except Exception:  # the app's fault, not the link's: count, go on
                                self.callback_errors += 1
                        topic = payload = None
                        if qos:
                            # Deliver first, then PUBACK: a crash in between means
                            # redelivery, never loss. Duplicates are fine, the device
                            # logic is idempotent.
                            await self._send(bytes((_PUBACK, 2, pid >> 8, pid & 0xFF)), None,
                                             gen)
                    elif ((first == _PUBACK and length == 2)
                          or (first == _SUBACK and length == 3
                              and (body[2] <= 2 or body[2] == SUB_REFUSED))):
                        # One packet id (not 0), and for a SUBACK one return code: we
                        # subscribe one filter at a time.
                        pid = (body[0] << 8) | body[1]
                        if not pid:
                            raise MalformedPacket("pid")  # packet id 0
                        if self._wait == (first << 16) | pid:
                            self._ack_code = body[2] if first == _SUBACK else 0
                        # else: a late ack for an earlier try of the same message; harmless
                    elif first != _PINGRESP or length:
                        # (a PINGRESP needs nothing: its arrival refreshed _last_rx)
                        raise MalformedPacket()  # not a packet a broker sends
                except MalformedPacket:
                    self.dropped_incoming += 1
        except Exception as exc:  # any fault, even our own bug, ends only this link
            self._fail(exc, gen)
