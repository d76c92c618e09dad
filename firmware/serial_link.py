# The device side of the serial link to a window PC's bridge (agent/bridge.py), for
# evaluators without a network of their own. Portable: MicroPython >= 1.22 and CPython.
#
# Frames are SLIP-delimited (END 0xC0, ESC 0xDB): type u8 | body | CRC32 u32 LE over type
# and body. A byte lost or flipped on the cable costs one frame (CRC), never the sync: the
# next END starts afresh. docs/agent.md, "Serial protocol", is the specification.
#
# The link carries MQTT, not votes of its own: the device publishes on its own topic
# suffixes (vote, birth, hb, evt) with its own MACs; the bridge connects to the hub's broker
# AS the device (the identity comes in HELLO) and relays. Nothing here is durable: the
# journal is the outgoing queue and the hub's application ack trims it, so a frame lost on
# the cable is only a delay.
#
# Two layers: Link is poll-based and allocation-light (the CPython agent drives it from
# its loop), SerialClient wraps it in the interface of firmware/mqtt.py's MQTTClient so
# the device App runs over a UART unchanged.
import binascii
import json
import struct

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]
        return x

try:
    from time import ticks_diff, ticks_ms
except ImportError:  # CPython: a monotonic millisecond count never wraps
    from time import monotonic as _monotonic  # type: ignore[attr-defined]

    def ticks_ms():
        return int(_monotonic() * 1000)

    def ticks_diff(a, b):  # type: ignore[no-redef]
        return a - b

END = const(0xC0)
ESC = const(0xDB)
ESC_END = const(0xDC)
ESC_ESC = const(0xDD)

# Device -> bridge
HELLO = const(0x01)  # JSON {"v":1,"d":id,"u":mqtt user,"p":password,"mx":max body}
PING = const(0x02)  # empty; the bridge answers STATUS
PUB = const(0x03)  # mid u16 | qos u8 | topic length u8 | topic suffix | payload
DACK = const(0x04)  # id u16: the MSG with this id was handled
# Bridge -> device
STATUS = const(0x81)  # state u8 | session generation u16
MSG = const(0x82)  # id u16 (0: no DACK wanted) | flags u8 | topic length u8 | suffix | payload
PUBACK = const(0x83)  # mid u16: the broker took the PUB with this mid (QoS 1)

ST_DOWN = const(0)  # the bridge knows the device but has no hub session
ST_UP = const(1)  # the bridge holds an MQTT session as the device
ST_REFUSED = const(2)  # the broker refused the identity, or the bridge is bound to another
ST_WHO = const(3)  # the bridge does not know this device: send HELLO

PROTO = const(1)
MAX_BODY = const(8448)  # one 8 KB downlink (firmware/app.py's limit) plus headers
_FLAG_RETAIN = const(1)
_SCRATCH = const(64)
_U32 = const(0xFFFFFFFF)


class LinkError(ValueError):
    """A caller mistake: a topic or frame the protocol cannot carry."""


class Framer:
    """Writes frames through write(buf) from one fixed scratch buffer: no per-frame
    allocation, whatever the payload size."""

    def __init__(self, write):
        self._write = write
        self._buf = bytearray(_SCRATCH)
        self._mv = memoryview(self._buf)
        self._n = 0
        self._one = bytearray(1)
        self._crc = bytearray(4)
        self.frames = 0

    def send(self, ftype, head=b"", topic=b"", payload=b""):
        """One frame: type, then head, topic and payload as its body."""
        one = self._one
        one[0] = ftype
        crc = binascii.crc32(one)
        crc = binascii.crc32(head, crc)
        crc = binascii.crc32(topic, crc)
        crc = binascii.crc32(payload, crc)
        struct.pack_into("<I", self._crc, 0, crc & _U32)
        self._n = 0
        # A leading END ends whatever line noise came before: the frame starts clean.
        self._raw(END)
        self._put(one)
        self._put(head)
        self._put(topic)
        self._put(payload)
        self._put(self._crc)
        self._raw(END)
        self._flush()
        self.frames += 1

    def _raw(self, b):
        if self._n >= _SCRATCH:
            self._flush()
        self._buf[self._n] = b
        self._n += 1

    def _put(self, data):
        for b in data:
            if b == END:
                self._raw(ESC)
                self._raw(ESC_END)
            elif b == ESC:
                self._raw(ESC)
                self._raw(ESC_ESC)
            else:
                self._raw(b)

    def _flush(self):
        if self._n:
            n = self._n
            self._n = 0
            self._write(self._mv[:n])


class Deframer:
    """Turns received bytes back into frames, in one buffer of max_body + 5 bytes.

    on_frame(ftype, body) gets a memoryview into that buffer, valid only during the call.
    What cannot be a frame is dropped and counted: a bad CRC, a frame longer than the
    buffer, a runt, a bad escape."""

    def __init__(self, max_body=MAX_BODY):
        self._buf = bytearray(max_body + 5)
        self._mv = memoryview(self._buf)
        self._n = 0
        self._esc = False
        self._bad = False  # the frame in progress is already lost: skip to the next END
        self.frames = 0
        self.bad_crc = 0
        self.too_long = 0
        self.runts = 0
        self.bad_escape = 0

    def feed(self, data, on_frame):
        buf = self._buf
        size = len(buf)
        for b in data:
            if b == END:
                n = self._n
                if self._bad:
                    pass
                elif n >= 5:
                    crc = binascii.crc32(self._mv[:n - 4]) & _U32
                    if struct.unpack_from("<I", buf, n - 4)[0] == crc:
                        self.frames += 1
                        on_frame(buf[0], self._mv[1:n - 4])
                    else:
                        self.bad_crc += 1
                elif n:
                    self.runts += 1
                self._n = 0
                self._esc = False
                self._bad = False
                continue
            if self._bad:
                continue
            if self._esc:
                self._esc = False
                if b == ESC_END:
                    b = END
                elif b == ESC_ESC:
                    b = ESC
                else:
                    self.bad_escape += 1
                    self._bad = True
                    continue
            elif b == ESC:
                self._esc = True
                continue
            if self._n >= size:
                self.too_long += 1
                self._bad = True
                continue
            buf[self._n] = b
            self._n += 1


def hello_body(device_id, user, password, max_body=MAX_BODY):
    return json.dumps({"v": PROTO, "d": device_id, "u": user or device_id, "p": password or "",
                       "mx": max_body}).encode()


def _suffix(topic, prefix):
    # "pj/<d>/up/vote" -> b"vote"; one topic level of identifier characters only, so the
    # bridge can put it under the device's own prefix and nowhere else.
    if prefix and topic.startswith(prefix):
        topic = topic[len(prefix):]
    if not 0 < len(topic) <= 64 or "/" in topic or "+" in topic or "#" in topic:
        raise LinkError("topic: not one level under the device's prefix")
    return topic.encode()


class Link:
    """The device's end of the serial link, driven by poll(now_ms) every few ms.

    `port` has read(n) -> bytes or None without blocking (a machine.UART with timeout=0,
    a pyserial port with timeout=0) and write(buf). `on_message(suffix, payload, retained)`
    gets each downlink (its DACK goes out once it returns); `on_session(up)` is told when
    the hub session through the bridge comes up (a new one: publish the birth) or goes down.
    """

    def __init__(self, port, hello, on_message=None, on_session=None, ping_ms=1000,
                 timeout_ms=5000, max_body=MAX_BODY, max_inflight=16, puback_ms=10000):
        self._port = port
        self._hello = hello
        self.on_message = on_message
        self.on_session = on_session
        self.ping_ms = ping_ms
        self.timeout_ms = timeout_ms
        self._framer = Framer(self._write)
        self.rx = Deframer(max_body)
        self._head = bytearray(4)
        self._mid = 0
        self._inflight = []  # mids of QoS 1 publishes without PUBACK
        self._sent_ms = []  # when each of them went out
        self._max_inflight = max_inflight
        self.puback_ms = puback_ms
        self._now = ticks_ms()
        self._rx_ms = self._now
        self._tx_ms = self._now
        self._due = True  # a HELLO or PING goes out at the next poll
        self._who = True  # the bridge does not know us yet: HELLO rather than PING
        self.linked = False  # a bridge answered within timeout_ms
        self.session = False  # ... and holds a hub session for this device
        self.refused = False
        self.gen = -1
        self.sessions = 0
        self.link_losses = 0
        self.read_errors = 0
        self.write_errors = 0
        self.unknown = 0  # frames of a type this side does not take, or too short
        self.puback_timeouts = 0
        self.callback_errors = 0

    @property
    def connected(self):
        return self.linked and self.session

    @property
    def inflight(self):
        return len(self._inflight)

    def acked(self, mid):
        """True once the broker took the QoS 1 publish `mid` (or the session ended)."""
        return mid not in self._inflight

    # -- sending -----------------------------------------------------------------------------
    def _write(self, buf):
        try:
            self._port.write(buf)
        except OSError:
            self.write_errors += 1
            raise

    def _send(self, ftype, head=b"", topic=b"", payload=b""):
        self._framer.send(ftype, head, topic, payload)
        self._tx_ms = self._now

    def publish(self, suffix, payload, qos=1):
        """Send one uplink; returns its mid (QoS 1: watch acked(mid)). OSError without a
        session; LinkError for a topic the link cannot carry."""
        topic = _suffix(suffix, "")
        if not self.connected:
            raise OSError(107, "no hub session over the serial link")
        if qos and len(self._inflight) >= self._max_inflight:
            raise OSError(105, "too many publishes awaiting PUBACK")
        self._mid = self._mid % 0xFFFF + 1
        mid = self._mid
        struct.pack_into("<HBB", self._head, 0, mid, 1 if qos else 0, len(topic))
        if qos:
            self._inflight.append(mid)
            self._sent_ms.append(self._now)
        try:
            self._send(PUB, self._head, topic, payload)
        except OSError:
            if qos:
                self._forget(self._inflight.index(mid))
            raise
        return mid

    def _forget(self, i):
        self._inflight.pop(i)
        self._sent_ms.pop(i)

    # -- receiving ---------------------------------------------------------------------------
    def poll(self, now=None):
        """Read what arrived, answer it, keep the link alive; call every few ms."""
        self._now = now = ticks_ms() if now is None else now
        for _ in range(8):  # bounded work per poll; the rest waits for the next one
            try:
                data = self._port.read(256)
            except OSError:
                self.read_errors += 1
                data = None
            if not data:
                break
            self.rx.feed(data, self._on_frame)
        # A PUB or its PUBACK lost on the wire would hold a place for ever: give it up
        # after puback_ms (counted). The record is still in the journal and goes again.
        while self._sent_ms and ticks_diff(now, self._sent_ms[0]) >= self.puback_ms:
            self._forget(0)
            self.puback_timeouts += 1
        if self.linked and ticks_diff(now, self._rx_ms) >= self.timeout_ms:
            self.link_losses += 1
            self.linked = False
            self._down()
            self._due = self._who = True  # HELLO at once
        if self._due or ticks_diff(now, self._tx_ms) >= self.ping_ms:
            self._due = False
            try:
                if self._who or not self.linked:
                    self._send(HELLO, self._hello)
                else:
                    self._send(PING)
            except OSError:
                self._tx_ms = now  # counted; tried again after ping_ms

    def _down(self):
        del self._inflight[:]
        del self._sent_ms[:]
        if self.session:
            self.session = False
            self._tell_session(False)

    def _tell_session(self, up):
        if self.on_session is not None:
            try:
                self.on_session(up)
            except Exception:  # noqa: BLE001 - the link must outlive a bad callback
                self.callback_errors += 1

    def _on_frame(self, ftype, body):
        self._rx_ms = self._now
        n = len(body)
        if ftype == STATUS and n >= 3:
            state = body[0]
            gen = body[1] | body[2] << 8
            self.linked = True
            self.refused = state == ST_REFUSED
            self._who = state == ST_WHO
            if state == ST_UP:
                if self.session and gen != self.gen:
                    self._down()  # the bridge reconnected meanwhile: a new session
                if not self.session:
                    self.session = True
                    self.gen = gen
                    self.sessions += 1
                    self._tell_session(True)
            else:
                self._down()
                if state == ST_WHO:
                    self._due = True  # HELLO at once, and at every ping until known
        elif ftype == MSG and n >= 4:
            msg_id = body[0] | body[1] << 8
            tlen = body[3]
            if 4 + tlen > n:
                self.unknown += 1
                return
            try:
                suffix = str(bytes(body[4:4 + tlen]), "utf-8")
                payload = bytes(body[4 + tlen:])
            except (UnicodeError, ValueError):
                self.unknown += 1
                return
            if self.on_message is not None:
                try:
                    self.on_message(suffix, payload, bool(body[2] & _FLAG_RETAIN))
                except Exception:  # noqa: BLE001 - counted; the DACK still goes out
                    self.callback_errors += 1
            if msg_id:
                struct.pack_into("<H", self._head, 0, msg_id)
                try:
                    self._send(DACK, self._head[:2])
                except OSError:
                    pass  # the bridge never acks it to the broker: it comes again
        elif ftype == PUBACK and n >= 2:
            mid = body[0] | body[1] << 8
            if mid in self._inflight:
                self._forget(self._inflight.index(mid))
        else:
            self.unknown += 1


class SerialClient:
    """firmware/mqtt.py's MQTTClient interface over a Link, for the device App:

        App(..., client_factory=lambda **kw: SerialClient(uart, **kw))

    The MQTT arguments give the identity the bridge connects with (client_id, user,
    password); server, port, ssl and will are the bridge's business and are ignored (the
    bridge sets the device's will itself). subscribe() is accepted and does nothing: the
    bridge subscribes to the device's downlinks.
    """

    def __init__(self, serial, client_id, user=None, password=None, on_message=None,
                 on_connect=None, max_packet=MAX_BODY, poll_ms=10, ack_timeout_ms=10000,
                 ping_ms=1000, timeout_ms=5000, **_mqtt_only):
        self.client_id = client_id
        self._up_prefix = "pj/" + client_id + "/up/"
        self._dn_prefix = "pj/" + client_id + "/dn/"
        self._on_message = on_message
        self._on_connect = on_connect
        self._poll_ms = poll_ms
        self._ack_ms = ack_timeout_ms
        self.link = Link(serial, hello_body(client_id, user, password, max_packet),
                         self._message, self._session, ping_ms, timeout_ms, max_packet)
        self._new_session = False
        self._stopping = False
        self._ever = False
        self.reconnects = 0
        self.callback_errors = 0

    def isconnected(self):
        return self.link.connected

    async def connected(self):
        import asyncio
        while not self.link.connected:
            await asyncio.sleep(self._poll_ms / 1000)

    def _session(self, up):
        if up:
            if self._ever:
                self.reconnects += 1
            self._ever = True
            self._new_session = True

    def _message(self, suffix, payload, retained):
        if self._on_message is not None:
            self._on_message(self._dn_prefix + suffix, payload, retained)

    async def run(self):
        import asyncio
        self._stopping = False
        while not self._stopping:
            self.link.poll()
            if self._new_session:
                self._new_session = False
                if self._on_connect is not None:
                    try:
                        await self._on_connect(self)
                    except OSError:
                        pass  # the session dropped again; the next one calls it anew
            await asyncio.sleep(self._poll_ms / 1000)

    async def publish(self, topic, payload, qos=0, retain=False):
        """qos 1 returns once the bridge relayed the broker's PUBACK; OSError if the
        session ends or no PUBACK comes within ack_timeout_ms."""
        import asyncio
        if isinstance(payload, str):
            payload = payload.encode()
        mid = self.link.publish(_suffix(topic, self._up_prefix).decode(), payload, qos)
        if not qos:
            return
        start = ticks_ms()
        # Polls the link itself: run() may be the caller (on_connect publishes the birth).
        while not self.link.acked(mid):
            if not self.link.connected:
                raise OSError(104, "serial session ended before PUBACK")
            if ticks_diff(ticks_ms(), start) >= self._ack_ms:
                raise OSError(110, "no PUBACK over the serial link")
            await asyncio.sleep(self._poll_ms / 1000)
            self.link.poll()
        if not self.link.connected:
            raise OSError(104, "serial session ended before PUBACK")

    async def subscribe(self, topic, qos=1):
        return qos

    async def disconnect(self):
        self._stopping = True
