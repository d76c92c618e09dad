# The serial link's device side (firmware/serial_link.py): byte-exact frames, resync after
# line damage, and the Link's session, publish, PUBACK, downlink and keepalive behaviour
# against a scripted bridge. Runs under CPython (pytest) and MicroPython (tests/core/run.py).
import json
import struct

import serial_link as S


class FakePort:
    """Both directions of a cable: `to_device` is what the device will read, `sent` what
    it wrote. read() returns None when empty, like a machine.UART with timeout=0."""

    def __init__(self):
        self.to_device = bytearray()
        self.sent = bytearray()
        self.broken = False

    def read(self, n):
        if self.broken:
            raise OSError(5, "EIO")
        if not self.to_device:
            return None
        data = bytes(self.to_device[:n])
        self.to_device = self.to_device[n:]
        return data

    def write(self, buf):
        if self.broken:
            raise OSError(5, "EIO")
        self.sent.extend(buf)
        return len(buf)


def frame(ftype, body=b""):
    out = bytearray()
    S.Framer(out.extend).send(ftype, body)
    return bytes(out)


def frames_of(data):
    got = []
    S.Deframer().feed(data, lambda t, body: got.append((t, bytes(body))))
    return got


def status(state, gen=7):
    return frame(S.STATUS, struct.pack("<BH", state, gen))


def msg(suffix, payload, msg_id=0, retained=False):
    head = struct.pack("<HBB", msg_id, 1 if retained else 0, len(suffix))
    return frame(S.MSG, head + suffix.encode() + payload)


def test_frames_are_byte_exact_with_escapes_and_crc32():
    assert frame(S.PING) == bytes.fromhex("c002a18e0c3cc0")
    out = bytearray()
    S.Framer(out.extend).send(S.PUB, b"\x01\x00\x01\x04", b"vote", b"\xc0\xdb{}")
    # END and ESC inside the body are escaped; the CRC covers the unescaped bytes.
    assert bytes(out) == bytes.fromhex("c00301000104766f7465dbdcdbdd7b7d8bd67b58c0")
    assert frames_of(bytes(out)) == [(S.PUB, b"\x01\x00\x01\x04vote\xc0\xdb{}")]


def test_a_damaged_frame_is_counted_and_the_next_one_still_arrives():
    good = frame(S.PUBACK, b"\x05\x00")
    damaged = bytearray(good)
    damaged[3] ^= 0x10
    rx = S.Deframer()
    got = []
    rx.feed(bytes(damaged) + b"\x01\x02noise" + good, lambda t, b: got.append((t, bytes(b))))
    assert got == [(S.PUBACK, b"\x05\x00")]
    assert rx.bad_crc == 2  # the damaged frame, and the noise between the two ENDs
    assert rx.frames == 1


def test_too_long_and_bad_escapes_are_dropped_whole_and_counted():
    rx = S.Deframer(max_body=16)
    got = []
    rx.feed(frame(S.MSG, b"x" * 40) + frame(S.PUBACK, b"\x01\x00"),
            lambda t, b: got.append(t))
    rx.feed(b"\xc0\x02\xdb\x01\xc0" + b"\xc0\x02\xc0", lambda t, b: got.append(t))
    assert got == [S.PUBACK]
    assert rx.too_long == 1 and rx.bad_escape == 1 and rx.runts == 1


def test_frames_split_across_reads_reassemble():
    data = frame(S.MSG, b"\x00\x00\x00\x03ctx{}") * 2
    rx = S.Deframer()
    got = []
    for i in range(len(data)):
        rx.feed(data[i:i + 1], lambda t, b: got.append(bytes(b)))
    assert got == [b"\x00\x00\x00\x03ctx{}"] * 2


def _link(port, events=None, messages=None):
    events = [] if events is None else events
    messages = [] if messages is None else messages
    hello = S.hello_body("D0001", "D0001", "secret")
    link = S.Link(port, hello, lambda s, p, r: messages.append((s, p, r)),
                  events.append, ping_ms=1000, timeout_ms=5000)
    return link, events, messages


def test_hello_until_a_bridge_answers_then_a_session_and_birth_can_go():
    port = FakePort()
    link, events, _ = _link(port)
    link.poll(0)
    hello = frames_of(bytes(port.sent))
    assert len(hello) == 1 and hello[0][0] == S.HELLO
    ident = json.loads(hello[0][1])
    assert ident == {"v": 1, "d": "D0001", "u": "D0001", "p": "secret", "mx": S.MAX_BODY}
    try:
        link.publish("birth", b"{}", 1)
        assert False, "publish without a session"
    except OSError:
        pass
    port.to_device.extend(status(S.ST_DOWN))
    link.poll(10)
    assert link.linked and not link.connected and events == []
    port.to_device.extend(status(S.ST_UP, 9))
    link.poll(20)
    assert link.connected and events == [True] and link.sessions == 1
    port.sent[:] = b""
    mid = link.publish("birth", b'{"v":1}', 1)
    expected = struct.pack("<HBB", mid, 1, 5) + b'birth{"v":1}'
    assert frames_of(bytes(port.sent)) == [(S.PUB, expected)]
    assert not link.acked(mid) and link.inflight == 1
    port.to_device.extend(frame(S.PUBACK, struct.pack("<H", mid)))
    link.poll(30)
    assert link.acked(mid) and link.inflight == 0


def test_downlinks_are_delivered_then_dacked():
    port = FakePort()
    link, events, messages = _link(port)
    port.to_device.extend(status(S.ST_UP))
    link.poll(0)
    port.sent[:] = b""
    port.to_device.extend(msg("ack", b'{"s":3}', msg_id=513) + msg("time", b'{"t":1}')
                          + msg("ctx", b"{}", msg_id=514, retained=True))
    link.poll(10)
    assert messages == [("ack", b'{"s":3}', False), ("time", b'{"t":1}', False),
                        ("ctx", b"{}", True)]
    # QoS 0 (id 0) wants no DACK.
    assert frames_of(bytes(port.sent)) == [(S.DACK, struct.pack("<H", 513)),
                                           (S.DACK, struct.pack("<H", 514))]


def test_a_lost_puback_frees_its_place_after_puback_ms():
    port = FakePort()
    link, events, _ = _link(port)
    port.to_device.extend(status(S.ST_UP))
    link.poll(0)
    lost = link.publish("vote", b"{}", 1)
    port.to_device.extend(status(S.ST_UP))  # the link is alive, only the PUBACK was lost
    link.poll(9000)
    kept = link.publish("vote", b"{}", 1)
    assert link.inflight == 2
    port.to_device.extend(status(S.ST_UP))
    link.poll(10000)
    assert link.acked(lost) and not link.acked(kept) and link.puback_timeouts == 1
    assert link.connected


def test_silence_ends_the_session_and_hello_starts_again():
    port = FakePort()
    link, events, _ = _link(port)
    port.to_device.extend(status(S.ST_UP))
    link.poll(0)
    mid = link.publish("vote", b"{}", 1)
    link.poll(1000)  # a PING went out; nothing came back
    assert link.connected
    port.sent[:] = b""
    link.poll(5000)
    assert not link.linked and not link.connected and events == [True, False]
    assert link.acked(mid)  # released: the journal sends it again in the next session
    assert [t for t, _ in frames_of(bytes(port.sent))] == [S.HELLO]
    assert link.link_losses == 1


def test_a_new_generation_or_who_is_a_new_session():
    port = FakePort()
    link, events, _ = _link(port)
    port.to_device.extend(status(S.ST_UP, 1))
    link.poll(0)
    port.to_device.extend(status(S.ST_UP, 1) + status(S.ST_UP, 2))
    link.poll(10)
    assert events == [True, False, True]
    port.sent[:] = b""
    port.to_device.extend(status(S.ST_WHO, 0))  # a restarted bridge
    link.poll(20)
    assert events == [True, False, True, False]
    assert [t for t, _ in frames_of(bytes(port.sent))] == [S.HELLO]
    port.to_device.extend(status(S.ST_REFUSED, 0))
    link.poll(30)
    assert link.refused and not link.connected


def test_port_errors_are_counted_not_raised_by_poll():
    port = FakePort()
    link, events, _ = _link(port)
    port.broken = True
    link.poll(0)
    link.poll(2000)
    assert link.read_errors == 2 and link.write_errors == 2
    port.broken = False
    port.to_device.extend(status(S.ST_UP))
    link.poll(2010)
    assert link.connected


def test_topics_outside_one_level_are_refused():
    port = FakePort()
    link, _, _ = _link(port)
    port.to_device.extend(status(S.ST_UP))
    link.poll(0)
    for bad in ("", "up/vote", "#", "a+b", "x" * 65):
        try:
            link.publish(bad, b"", 0)
            assert False, bad
        except S.LinkError:
            pass


def test_serial_client_runs_the_mqtt_client_interface():
    try:
        import asyncio
    except ImportError:
        import uasyncio as asyncio  # type: ignore
    port = FakePort()
    got = []
    connects = []

    async def on_connect(client):
        connects.append(client.reconnects)
        await client.subscribe("pj/D0001/dn/#", 1)
        await client.publish("pj/D0001/up/birth", b"{}", 1)

    client = S.SerialClient(port, client_id="D0001", server="ignored", port=1883,
                            user="D0001", password="pw", keepalive=30, clean_session=False,
                            will=None, ssl=None, max_packet=4096,
                            on_message=lambda t, p, r: got.append((t, p, r)),
                            on_connect=on_connect, poll_ms=1)

    pubs = []
    state = {"stop": False}

    async def bridge():
        # A scripted bridge: answer the HELLO, PUBACK every QoS 1 PUB, send one downlink.
        rx = S.Deframer()

        def on_frame(t, body):
            if t == S.HELLO:
                port.to_device.extend(status(S.ST_UP, 4))
            elif t == S.PUB:
                mid, qos, tlen = struct.unpack("<HBB", bytes(body[:4]))
                pubs.append(bytes(body[4:4 + tlen]))
                if qos:
                    port.to_device.extend(frame(S.PUBACK, struct.pack("<H", mid)))
                if len(pubs) == 1:
                    port.to_device.extend(msg("prompt", b'{"pid":"P1"}', msg_id=1))
        while not state["stop"]:
            data = bytes(port.sent)
            port.sent[:] = b""
            rx.feed(data, on_frame)
            await asyncio.sleep(0.002)

    async def main():
        fake = asyncio.create_task(bridge())
        task = asyncio.create_task(client.run())
        for _ in range(500):
            if got:
                break
            await asyncio.sleep(0.005)
        await client.connected()
        await client.publish("pj/D0001/up/vote", b'{"s":1}', 1)
        await client.disconnect()
        await asyncio.sleep(0.02)
        state["stop"] = True
        await asyncio.sleep(0.01)
        task.cancel()
        fake.cancel()

    asyncio.run(main())
    assert connects == [0]
    assert pubs == [b"birth", b"vote"]
    assert got == [("pj/D0001/dn/prompt", b'{"pid":"P1"}', False)]
    assert client.isconnected()
