# The broker's half of MQTT 3.1.1, for tests only: framing a byte stream into packets,
# decoding what a client sends (CONNECT, SUBSCRIBE) and encoding what a broker sends
# (CONNACK, SUBACK). Kept out of firmware/mqtt.py so the device never loads it.
# Portable: the core tests import it under CPython and under the MicroPython unix port.
from mqtt import CONNACK, SUBACK, MalformedPacket, encode_length


def split_packet(buf):
    """(first byte, body, bytes used) of the first whole packet in buf, or None if partial."""
    if len(buf) < 2:
        return None
    value = 0
    shift = 0
    for i in range(1, 5):
        if i >= len(buf):
            return None
        digit = buf[i]
        value |= (digit & 0x7F) << shift
        if not digit & 0x80:
            end = i + 1 + value
            if len(buf) < end:
                return None
            return buf[0], bytes(buf[i + 1:end]), end
        shift += 7
    raise MalformedPacket("remaining length longer than 4 bytes")


class _Cursor:
    # Reads length-prefixed fields from a packet body; every overrun is a MalformedPacket.
    def __init__(self, body):
        self.body = body
        self.pos = 0

    def take(self, n):
        if self.pos + n > len(self.body):
            raise MalformedPacket("field runs past the end of the packet")
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
            raise MalformedPacket("string is not UTF-8")

    def rest(self):
        return bytes(self.take(len(self.body) - self.pos))


def decode_connect(body):
    """CONNECT body -> dict(client_id, keepalive, clean_session, will, user, password)."""
    cur = _Cursor(body)
    if cur.blob() != b"MQTT" or cur.take(1)[0] != 4:
        raise MalformedPacket("not MQTT 3.1.1")
    flags = cur.take(1)[0]
    if flags & 0x01:
        raise MalformedPacket("reserved connect flag set")
    keepalive = cur.u16()
    client_id = cur.text()
    will = None
    if flags & 0x04:
        w_topic = cur.text()
        will = (w_topic, cur.blob(), (flags >> 3) & 3, bool(flags & 0x20))
    elif flags & 0x38:
        raise MalformedPacket("will qos/retain without a will")
    user = cur.text() if flags & 0x80 else None
    password = cur.blob() if flags & 0x40 else None
    if cur.pos != len(body):
        raise MalformedPacket("bytes after the connect payload")
    return {"client_id": client_id, "keepalive": keepalive,
            "clean_session": bool(flags & 0x02), "will": will,
            "user": user, "password": password}


def connack_packet(session_present, code):
    return bytes((CONNACK, 2, 1 if session_present else 0, code))


def decode_subscribe(body):
    """SUBSCRIBE body -> (pid, [(topic filter, qos), ...])."""
    cur = _Cursor(body)
    pid = cur.u16()
    wanted = []
    while cur.pos < len(body):
        topic = cur.text()
        qos = cur.take(1)[0]
        if qos > 2:
            raise MalformedPacket("bad requested qos")
        wanted.append((topic, qos))
    if not pid or not wanted:
        raise MalformedPacket("bad SUBSCRIBE")
    return pid, wanted


def suback_packet(pid, codes):
    body = bytes((pid >> 8, pid & 0xFF)) + bytes(codes)
    return bytes((SUBACK,)) + encode_length(len(body)) + body
