# MQTTClient (firmware/mqtt.py) against a fake link: a byte-buffer stream standing in for
# TCP, with the test playing the broker packet by packet. Runs under CPython and MicroPython.
# Timeouts here only stop a broken client from hanging the run; nothing asserts on timing.
import asyncio

import mqtt
from mqtt_broker import connack_packet, publish_packet, puback_packet, split_packet, suback_packet

_GUARD_S = 10


class FakeLink:
    """One fake TCP link. The client uses readinto/write/drain/close; the test uses the rest."""

    def __init__(self):
        self.to_client = b""
        self.from_client = b""
        self.eof = False      # the broker hung up
        self.closed = False   # the client closed its end
        self.stalled = False  # writes never go through (a host that never answers)
        self._readable = asyncio.Event()
        self._written = asyncio.Event()

    async def readinto(self, buf):
        while not self.to_client and not self.eof and not self.closed:
            self._readable.clear()
            await self._readable.wait()
        if self.closed:
            raise OSError(9, "closed")
        n = min(len(buf), len(self.to_client))
        buf[:n] = self.to_client[:n]
        self.to_client = self.to_client[n:]
        return n

    def write(self, data):
        if self.closed or self.eof:
            raise OSError(32, "broken pipe")
        self.from_client += bytes(data)
        self._written.set()

    async def drain(self):
        while self.stalled and not self.closed:  # a peer that never takes the bytes
            await asyncio.sleep(0.01)

    def close(self):
        self.closed = True
        self._readable.set()
        self._written.set()

    def feed(self, data):
        self.to_client += data
        self._readable.set()

    def hang_up(self):
        self.eof = True
        self._readable.set()

    async def next_packet(self):
        """(first byte, body) of the next packet the client sent."""
        while True:
            got = split_packet(self.from_client)
            if got:
                self.from_client = self.from_client[got[2]:]
                return got[0], got[1]
            if self.closed:
                raise OSError(9, "client closed the link")
            self._written.clear()
            await asyncio.wait_for(self._written.wait(), _GUARD_S)

    async def next_packet_not_ping(self):
        while True:
            first, body = await self.next_packet()
            if first != 0xC0:
                return first, body


class FakeNet:
    """Hands the client a new FakeLink per connection; refuses the first `refuse` tries."""

    def __init__(self, refuse=0, stall=0):
        self.refuse = refuse
        self.stall = stall  # this many links whose writes never go through
        self.links = []
        self.addresses = []
        self._opened = asyncio.Event()

    async def open_connection(self, host, port):
        self.addresses.append((host, port))
        if self.refuse:
            self.refuse -= 1
            raise OSError(111, "connection refused")
        link = FakeLink()
        if self.stall:
            self.stall -= 1
            link.stalled = True
        self.links.append(link)
        self._opened.set()
        return link, link

    async def link(self, index):
        while len(self.links) <= index:
            self._opened.clear()
            await asyncio.wait_for(self._opened.wait(), _GUARD_S)
        return self.links[index]


def _client(net, **kw):
    # A device allocates its buffer once at boot; a test run builds a client per test in
    # one 64 KB heap, where a smaller buffer keeps fragmentation from failing the next one.
    kw.setdefault("max_packet", 512)
    kw.setdefault("backoff_max_ms", 20)
    kw.setdefault("ack_timeout_ms", 200)
    return mqtt.MQTTClient("D1", "hub.local", open_connection=net.open_connection, **kw)


async def _accept(net, index=0):
    """Take the client's CONNECT on link `index` and answer it with an accepting CONNACK."""
    link = await net.link(index)
    first, _ = await link.next_packet()
    assert first == 0x10
    link.feed(connack_packet(False, 0))
    return link


async def _stop(client, task):
    await client.disconnect()
    await asyncio.wait_for(task, _GUARD_S)


def _run(scenario):
    asyncio.run(asyncio.wait_for(scenario(), 3 * _GUARD_S))


def test_connect_sends_connect_then_on_connect_runs_after_connack():
    async def scenario():
        net = FakeNet()
        calls = []
        done = asyncio.Event()

        async def on_connect(client):
            calls.append(client.isconnected())
            done.set()

        client = _client(net, user="D1", password="pw", keepalive=30,
                         will=("pj/D1/up/will", b"off", 1, False), on_connect=on_connect)
        task = asyncio.create_task(client.run())
        link = await net.link(0)
        first, body = await link.next_packet()
        assert bytes((first, len(body))) + body == (
            b"\x10\x2a\x00\x04MQTT\x04\xcc\x00\x1e\x00\x02D1\x00\x0dpj/D1/up/will"
            b"\x00\x03off\x00\x02D1\x00\x02pw")
        assert not client.isconnected()
        link.feed(connack_packet(True, 0))
        await client.connected()
        await asyncio.wait_for(done.wait(), _GUARD_S)
        assert calls == [True]
        assert client.session_present
        assert net.addresses == [("hub.local", 1883)]
        await _stop(client, task)

    _run(scenario)


def test_qos1_publish_is_resent_with_dup_until_puback_arrives():
    async def scenario():
        net = FakeNet()
        client = _client(net)
        task = asyncio.create_task(client.run())
        link = await _accept(net)
        await client.connected()
        pub = asyncio.create_task(client.publish("pj/D1/up/vote", b'{"s":1}', qos=1))
        first, body = await link.next_packet()
        assert bytes((first,)) + bytes((len(body),)) + body == (
            b"\x32\x18\x00\x0dpj/D1/up/vote\x00\x01{\"s\":1}")
        # no PUBACK: the same packet id comes again, now with DUP
        again, body2 = await link.next_packet()
        assert again == first | 0x08 and body2 == body
        assert client.pub_retries >= 1
        assert not pub.done()
        link.feed(puback_packet(1))
        await asyncio.wait_for(pub, _GUARD_S)
        # the next publish gets the next packet id and no DUP
        pub = asyncio.create_task(client.publish("pj/D1/up/vote", b"2", qos=1))
        while True:
            first, body = await link.next_packet()
            if mqtt.decode_publish(first, body)[5] == 2:
                break
        assert not first & 0x08
        link.feed(puback_packet(2))
        await asyncio.wait_for(pub, _GUARD_S)
        await _stop(client, task)

    _run(scenario)


def test_qos1_publish_raises_oserror_when_the_link_drops_before_puback():
    async def scenario():
        net = FakeNet()
        client = _client(net, ack_timeout_ms=5000)
        task = asyncio.create_task(client.run())
        link = await _accept(net)
        await client.connected()
        pub = asyncio.create_task(client.publish("pj/D1/up/vote", b"v", qos=1))
        first, _ = await link.next_packet()
        assert first == 0x32
        link.hang_up()
        try:
            await asyncio.wait_for(pub, _GUARD_S)
        except OSError:
            pass
        else:
            raise AssertionError("publish returned although no PUBACK came")
        # run() reconnects by itself and counts it
        await _accept(net, 1)
        await client.connected()
        assert client.reconnects == 1
        try:
            await client.publish("pj/D1/up/#", b"v", qos=1)
        except mqtt.MQTTError:
            pass
        else:
            raise AssertionError("a wildcard topic was published")
        await _stop(client, task)

    _run(scenario)


def test_incoming_qos1_publish_is_delivered_then_pubacked_duplicates_too():
    async def scenario():
        net = FakeNet()
        got = []

        def on_message(topic, payload, retained):
            got.append((topic, payload, retained, len(link.from_client)))

        client = _client(net, on_message=on_message)
        task = asyncio.create_task(client.run())
        link = await _accept(net)
        await client.connected()
        link.feed(publish_packet("pj/D1/dn/prompt", b'{"pid":"P1"}', qos=1, pid=7))
        first, body = await link.next_packet()
        assert bytes((first, len(body))) + body == b"\x40\x02\x00\x07"
        # delivered before the PUBACK was written
        assert got == [("pj/D1/dn/prompt", b'{"pid":"P1"}', False, 0)]
        link.feed(publish_packet("pj/D1/dn/prompt", b'{"pid":"P1"}', qos=1, pid=7,
                                      dup=True))
        link.feed(publish_packet("pj/D1/dn/ctx", b"{}", retain=True))
        first, body = await link.next_packet()
        assert first == 0x40 and body == b"\x00\x07"
        while len(got) < 3:
            await asyncio.sleep(0.01)
        assert got[1][:3] == ("pj/D1/dn/prompt", b'{"pid":"P1"}', False)
        assert got[2][:3] == ("pj/D1/dn/ctx", b"{}", True)
        assert client.dropped_incoming == 0
        await _stop(client, task)

    _run(scenario)


def test_oversized_incoming_packet_is_discarded_counted_and_pubacked():
    async def scenario():
        net = FakeNet()
        got = []
        client = _client(net, max_packet=64,
                         on_message=lambda topic, payload, retained: got.append(payload))
        task = asyncio.create_task(client.run())
        link = await _accept(net)
        await client.connected()
        link.feed(publish_packet("pj/D1/dn/cat", bytes(range(256)) * 3, qos=1, pid=9))
        link.feed(publish_packet("pj/D1/dn/time", b'{"t":1}'))
        first, body = await link.next_packet()
        assert first == 0x40 and body == b"\x00\x09"
        while not got:
            await asyncio.sleep(0.01)
        assert got == [b'{"t":1}']
        assert client.dropped_incoming == 1
        assert client.isconnected() and len(net.links) == 1
        await _stop(client, task)

    _run(scenario)


def test_malformed_incoming_packets_are_discarded_and_counted():
    async def scenario():
        net = FakeNet()
        got = []
        client = _client(net, on_message=lambda topic, payload, retained: got.append(topic))
        task = asyncio.create_task(client.run())
        link = await _accept(net)
        await client.connected()
        link.feed(b"\x36\x05\x00\x01a\x00\x01")      # qos 3
        link.feed(b"\x30\x03\x00\x05a")              # topic longer than the packet
        link.feed(b"\x34\x06\x00\x01a\x00\x01x")     # qos 2: never asked for
        link.feed(b"\xa2\x00")                       # a packet a broker never sends
        link.feed(b"\x41\x02\x00\x01")               # PUBACK with bad flags
        link.feed(b"\x40\x02\x00\x00")               # PUBACK for packet id 0
        link.feed(b"\x40\x03\x00\x01\x00")           # PUBACK one byte too long
        link.feed(b"\x90\x03\x00\x01\x03")           # SUBACK with return code 3
        link.feed(b"\x90\x02\x00\x01")               # SUBACK without a return code
        link.feed(publish_packet("ok", b""))
        while not got:
            await asyncio.sleep(0.01)
        assert got == ["ok"]
        assert client.dropped_incoming == 9
        assert client.isconnected() and len(net.links) == 1
        await _stop(client, task)

    _run(scenario)


def test_keepalive_pings_and_a_silent_broker_means_reconnect_and_on_connect_again():
    async def scenario():
        net = FakeNet()
        connects = []

        async def on_connect(client):
            connects.append(client.reconnects)

        client = _client(net, keepalive=1, on_connect=on_connect)
        task = asyncio.create_task(client.run())
        link = await _accept(net)
        first, body = await link.next_packet()
        assert first == 0xC0 and body == b""
        link.feed(b"\xd0\x00")
        # from now on the broker says nothing: the client must give up on this link
        await _accept(net, 1)
        await client.connected()
        while len(connects) < 2:
            await asyncio.sleep(0.01)
        assert connects == [0, 1]
        assert link.closed
        assert "silent" in client.last_fault
        await _stop(client, task)

    _run(scenario)


def test_subscribe_sends_subscribe_and_returns_the_granted_qos():
    async def scenario():
        net = FakeNet()
        client = _client(net)
        task = asyncio.create_task(client.run())
        link = await _accept(net)
        await client.connected()
        sub = asyncio.create_task(client.subscribe("pj/D1/dn/#", 1))
        first, body = await link.next_packet()
        assert bytes((first, len(body))) + body == b"\x82\x0f\x00\x01\x00\x0apj/D1/dn/#\x01"
        link.feed(suback_packet(1, [1]))
        assert await asyncio.wait_for(sub, _GUARD_S) == 1
        sub = asyncio.create_task(client.subscribe("pj/D2/dn/#", 1))
        await link.next_packet()
        link.feed(suback_packet(2, [mqtt.SUB_REFUSED]))
        assert await asyncio.wait_for(sub, _GUARD_S) == mqtt.SUB_REFUSED
        await _stop(client, task)

    _run(scenario)


def test_refused_connections_are_retried_with_backoff_and_counted():
    async def scenario():
        net = FakeNet(refuse=2)
        client = _client(net)
        task = asyncio.create_task(client.run())
        link = await net.link(0)
        await link.next_packet()
        link.feed(connack_packet(False, 5))  # not authorised
        link = await _accept(net, 1)
        await client.connected()
        assert client.connect_failures == 3
        assert client.reconnects == 0
        assert net.links[0].closed
        assert len(net.addresses) == 4
        await _stop(client, task)

    _run(scenario)


def test_a_connect_that_never_goes_through_times_out_and_is_retried():
    async def scenario():
        net = FakeNet(stall=1)
        client = _client(net)  # ack_timeout_ms=200
        task = asyncio.create_task(client.run())
        await _accept(net, 1)
        await client.connected()
        assert client.connect_failures == 1 and net.links[0].closed
        await _stop(client, task)

    _run(scenario)


def test_a_connack_with_reserved_bits_is_a_failed_connect():
    async def scenario():
        net = FakeNet()
        client = _client(net)
        task = asyncio.create_task(client.run())
        link = await net.link(0)
        await link.next_packet()
        link.feed(b"\x20\x02\x02\x00")  # flags other than session-present set
        await _accept(net, 1)
        await client.connected()
        assert client.connect_failures == 1 and not client.session_present
        assert net.links[0].closed
        await _stop(client, task)

    _run(scenario)


def test_caller_mistakes_raise_mqtt_error_connected_or_not():
    async def scenario():
        client = _client(FakeNet())
        for call in (client.publish("a", 5),  # not 5 zero bytes
                     client.publish("a/+", b""), client.publish("a", b"", 2),
                     client.subscribe("a#"), client.subscribe("a", 2)):
            try:
                await call
            except mqtt.MQTTError:
                continue
            raise AssertionError("accepted a caller mistake")

    _run(scenario)


def test_disconnect_sends_disconnect_closes_and_run_returns():
    async def scenario():
        net = FakeNet()
        client = _client(net)
        task = asyncio.create_task(client.run())
        link = await _accept(net)
        await client.connected()
        await client.disconnect()
        first, body = await link.next_packet_not_ping()
        assert first == 0xE0 and body == b""
        await asyncio.wait_for(task, _GUARD_S)
        assert link.closed and not client.isconnected()
        try:
            await client.publish("pj/D1/up/hb", b"{}")
        except OSError:
            pass
        else:
            raise AssertionError("published while disconnected")
        assert len(net.links) == 1

    _run(scenario)
