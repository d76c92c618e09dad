# The broker's half of MQTT 3.1.1 for the client tests (imported by tests/core/test_mqtt_*.py):
# framing a byte stream, decoding what a client sends, encoding what a broker sends. The
# device never needs it, so it lives here rather than in firmware/mqtt.py, where every
# function would cost the device's heap. Runs under CPython and MicroPython.
import mqtt


def decode_length(buf, offset=0):
    """(remaining length, offset just after it); MalformedPacket if truncated or too long."""
    value = 0
    for i in range(4):
        if offset + i >= len(buf):
            raise mqtt.MalformedPacket("truncated remaining length")
        digit = buf[offset + i]
        value |= (digit & 0x7F) << (7 * i)
        if not digit & 0x80:
            return value, offset + i + 1
    raise mqtt.MalformedPacket("remaining length longer than 4 bytes")


def split_packet(buf):
    """(first byte, body, bytes used) of the first whole packet in buf, or None if partial."""
    if len(buf) < 2:
        return None
    try:
        length, start = decode_length(buf, 1)
    except mqtt.MalformedPacket:
        if len(buf) < 5:  # the length bytes themselves have not all arrived
            return None
        raise
    if len(buf) < start + length:
        return None
    return buf[0], bytes(buf[start:start + length]), start + length


def whole(first, body):
    return bytes((first,)) + mqtt.encode_length(len(body)) + body


def publish_packet(topic, payload, qos=0, retain=False, dup=False, pid=0):
    """A whole PUBLISH, as a broker forwards it (the client sends header and payload)."""
    payload = payload.encode() if isinstance(payload, str) else bytes(payload)
    return mqtt.publish_header(topic, len(payload), qos, retain, dup, pid) + payload


def puback_packet(pid):
    return bytes((0x40, 2, pid >> 8, pid & 0xFF))


def connack_packet(session_present, code):
    return bytes((0x20, 2, 1 if session_present else 0, code))


def suback_packet(pid, codes):
    return whole(0x90, bytes((pid >> 8, pid & 0xFF)) + bytes(codes))


class _Cursor:
    # Reads length-prefixed fields from a packet body; every overrun is a MalformedPacket.
    def __init__(self, body):
        self.body = body
        self.pos = 0

    def take(self, n):
        if self.pos + n > len(self.body):
            raise mqtt.MalformedPacket("field runs past the end of the packet")
        part = self.body[self.pos:self.pos + n]
        self.pos += n
        return part

    def u16(self):
        part = self.take(2)
        return (part[0] << 8) | part[1]

    def blob(self):
        return bytes(self.take(self.u16()))

    def text(self):
        try:
            return self.blob().decode()
        except UnicodeError:
            raise mqtt.MalformedPacket("string is not UTF-8")


def decode_connect(body):
    """CONNECT body -> dict(client_id, keepalive, clean_session, will, user, password)."""
    cur = _Cursor(body)
    if cur.blob() != b"MQTT" or cur.take(1)[0] != 4:
        raise mqtt.MalformedPacket("not MQTT 3.1.1")
    flags = cur.take(1)[0]
    if flags & 0x01:
        raise mqtt.MalformedPacket("reserved connect flag set")
    keepalive = cur.u16()
    client_id = cur.text()
    will = None
    if flags & 0x04:
        w_topic = cur.text()
        will = (w_topic, cur.blob(), (flags >> 3) & 3, bool(flags & 0x20))
    elif flags & 0x38:
        raise mqtt.MalformedPacket("will qos/retain without a will")
    user = cur.text() if flags & 0x80 else None
    password = cur.blob() if flags & 0x40 else None
    if cur.pos != len(body):
        raise mqtt.MalformedPacket("bytes after the connect payload")
    return {"client_id": client_id, "keepalive": keepalive,
            "clean_session": bool(flags & 0x02), "will": will,
            "user": user, "password": password}


def decode_subscribe(body):
    """SUBSCRIBE body -> (pid, [(topic filter, qos), ...])."""
    cur = _Cursor(body)
    pid = cur.u16()
    wanted = []
    while cur.pos < len(body):
        topic = cur.text()
        qos = cur.take(1)[0]
        if qos > 2:
            raise mqtt.MalformedPacket("bad requested qos")
        wanted.append((topic, qos))
    if not pid or not wanted:
        raise mqtt.MalformedPacket("bad SUBSCRIBE")
    return pid, wanted
