# MQTT 3.1.1 packets from firmware/mqtt.py, byte for byte against hand-computed bytes
# (section numbers are from the OASIS MQTT 3.1.1 spec); runs under CPython and MicroPython.
import mqtt


from mqtt_broker import (connack_packet, decode_connect, decode_length, decode_subscribe,
                         publish_packet, split_packet, suback_packet, whole)


def _raises(kind, fn, *args):
    try:
        fn(*args)
    except kind:
        return
    raise AssertionError("no %s from %r%r" % (kind.__name__, fn, args))


def test_remaining_length_boundaries_encode_as_in_the_spec_table():
    # 2.2.3: one byte up to 127, two up to 16383, three up to 2097151, four up to 268435455.
    table = [
        (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"), (2097151, b"\xff\xff\x7f"), (2097152, b"\x80\x80\x80\x01"),
        (268435455, b"\xff\xff\xff\x7f"),
    ]
    for value, raw in table:
        assert mqtt.encode_length(value) == raw, value
        assert decode_length(raw) == (value, len(raw)), value
        assert decode_length(b"\x30" + raw + b"tail", 1) == (value, 1 + len(raw))


def test_remaining_length_out_of_range_or_too_long_is_rejected():
    _raises(mqtt.MQTTError, mqtt.encode_length, 268435456)
    _raises(mqtt.MQTTError, mqtt.encode_length, -1)
    _raises(mqtt.MalformedPacket, decode_length, b"\xff\xff\xff\xff\x01")
    _raises(mqtt.MalformedPacket, decode_length, b"\x80\x80")


def test_connect_with_will_and_credentials_is_byte_exact():
    packet = mqtt.connect_packet("D1", keepalive=30, clean_session=False,
                                 will=("pj/D1/up/will", b"off", 1, False),
                                 user="D1", password="pw")
    # flags 0xCC = user 0x80 | password 0x40 | will qos 1 (0x08) | will 0x04, no clean session
    assert packet == (b"\x10\x2a" b"\x00\x04MQTT\x04\xcc\x00\x1e"
                      b"\x00\x02D1" b"\x00\x0dpj/D1/up/will" b"\x00\x03off"
                      b"\x00\x02D1" b"\x00\x02pw")


def test_minimal_clean_connect_and_retained_qos0_will_flags():
    assert mqtt.connect_packet("a", keepalive=60, clean_session=True) == (
        b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x01a")
    packet = mqtt.connect_packet("a", keepalive=0, clean_session=True,
                                 will=("w", b"", 0, True))
    # will retain 0x20 | will 0x04 | clean 0x02
    assert packet == b"\x10\x12\x00\x04MQTT\x04\x26\x00\x00\x00\x01a\x00\x01w\x00\x00"


def test_connect_round_trips_through_the_decoder():
    packet = mqtt.connect_packet("D0042", keepalive=30, clean_session=False,
                                 will=("pj/D0042/up/will", b'{"online":false}', 1, False),
                                 user="D0042", password=b"secret")
    got = split_packet(packet)
    assert got[0] == 0x10 and got[2] == len(packet)
    fields = decode_connect(got[1])
    assert fields == {"client_id": "D0042", "keepalive": 30, "clean_session": False,
                      "will": ("pj/D0042/up/will", b'{"online":false}', 1, False),
                      "user": "D0042", "password": b"secret"}


def test_connect_caller_mistakes_are_refused():
    _raises(mqtt.MQTTError, mqtt.connect_packet, "D1", 30, True, None, None, "pw")
    _raises(mqtt.MQTTError, mqtt.connect_packet, "", 30, False)
    _raises(mqtt.MQTTError, mqtt.connect_packet, "D1", 65536)
    _raises(mqtt.MQTTError, mqtt.connect_packet, "D1", 30, True, ("a/#", b"", 0, False))
    _raises(mqtt.MQTTError, mqtt.connect_packet, "D1", 30, True, ("a", b"", 2, False))


def test_the_test_broker_encodes_connack_and_suback():
    # (The client reads CONNACK, PUBACK and SUBACK itself, malformed ones included: see
    # test_mqtt_client_fake_link.py.)
    assert connack_packet(True, 0) == b"\x20\x02\x01\x00"
    assert suback_packet(1, [1]) == b"\x90\x03\x00\x01\x01"
    assert whole(0xD0, b"") == b"\xd0\x00"


def test_publish_qos1_with_packet_id_and_dup_is_byte_exact():
    assert publish_packet("a/b", b"hi", qos=1, pid=10) == (
        b"\x32\x09\x00\x03a/b\x00\x0ahi")
    assert publish_packet("a/b", b"hi", qos=1, pid=10, dup=True) == (
        b"\x3a\x09\x00\x03a/b\x00\x0ahi")
    assert publish_packet("a/b", "hi", qos=0, retain=True) == b"\x31\x07\x00\x03a/bhi"
    assert mqtt.publish_header("a/b", 2, 1, False, False, 0x1234) == (
        b"\x32\x09\x00\x03a/b\x12\x34")


def test_publish_at_the_one_and_two_byte_length_boundary():
    # topic "t" takes 3 bytes, so 124 payload bytes make 127 and 125 make 128.
    assert publish_packet("t", bytes(124))[:2] == b"\x30\x7f"
    packet = publish_packet("t", bytes(125))
    assert packet[:3] == b"\x30\x80\x01" and len(packet) == 3 + 128


def test_publish_round_trips_through_the_decoder():
    payload = bytes(range(256))
    packet = publish_packet("pj/D1/up/vote", payload, qos=1, retain=True, dup=True,
                            pid=65535)
    first, body, used = split_packet(packet + b"\xc0")
    assert used == len(packet)
    assert mqtt.decode_publish(first, body) == (
        "pj/D1/up/vote", payload, 1, True, True, 65535)
    first, body, _ = split_packet(publish_packet("x/y", b""))
    assert mqtt.decode_publish(first, memoryview(body)) == ("x/y", b"", 0, False, False, 0)


def test_publish_caller_mistakes_are_refused():
    _raises(mqtt.MQTTError, mqtt.publish_header, "a/+", 0)
    _raises(mqtt.MQTTError, mqtt.publish_header, "a/#", 0)
    _raises(mqtt.MQTTError, mqtt.publish_header, "", 0)
    _raises(mqtt.MQTTError, mqtt.publish_header, "a\x00", 0)
    _raises(mqtt.MQTTError, mqtt.publish_header, "a", 0, 2, False, False, 1)
    _raises(mqtt.MQTTError, mqtt.publish_header, "a", 0, 1, False, False, 0)
    _raises(mqtt.MQTTError, mqtt.publish_header, "a", 0, 1, False, False, 65536)
    _raises(mqtt.MQTTError, mqtt.publish_header, "a", 0, 0, False, True, 0)


def test_malformed_publish_is_rejected():
    _raises(mqtt.MalformedPacket, mqtt.decode_publish, 0x36, b"\x00\x01a\x00\x01")  # qos 3
    _raises(mqtt.MalformedPacket, mqtt.decode_publish, 0x30, b"\x00\x05a")  # topic overruns
    _raises(mqtt.MalformedPacket, mqtt.decode_publish, 0x32, b"\x00\x01a\x00")  # short pid
    _raises(mqtt.MalformedPacket, mqtt.decode_publish, 0x32, b"\x00\x01a\x00\x00")  # pid 0
    _raises(mqtt.MalformedPacket, mqtt.decode_publish, 0x30, b"\x00\x02\xff\xfe")  # not UTF-8
    _raises(mqtt.MalformedPacket, mqtt.decode_publish, 0x30, b"\x00\x03a/+")  # wildcard
    _raises(mqtt.MalformedPacket, mqtt.decode_publish, 0x30, b"\x00\x00x")  # empty topic


def test_topic_filters_and_the_test_brokers_decoders():
    for bad in ("a/#/b", "a#", "a+/b", "", "a\x00", None):
        _raises(mqtt.MQTTError, mqtt.check_filter, bad)
    for good in ("#", "+", "a/+/c", "pj/+/up/#"):
        assert mqtt.check_filter(good) == good
    _raises(mqtt.MalformedPacket, decode_subscribe, b"\x00\x01\x00\x01a\x03")
    _raises(mqtt.MalformedPacket, decode_connect, b"\x00\x04MQIsdp\x03")


def test_partial_input_is_not_a_packet_yet():
    # (PINGREQ and DISCONNECT, the two fixed packets a client sends, are checked byte for
    # byte on the wire in test_mqtt_client_fake_link.py.)
    packet = publish_packet("t", bytes(200))
    for cut in (0, 1, 2, 3, len(packet) - 1):
        assert split_packet(packet[:cut]) is None, cut
    assert split_packet(b"\xd0\x00") == (0xD0, b"", 2)
    _raises(mqtt.MalformedPacket, split_packet, b"\x30\xff\xff\xff\xff\x01")
