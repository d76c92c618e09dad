# Wire codec: votes, acks, heartbeats and downlink messages.
# The canonical byte form of a vote is what the per-device HMAC-SHA256 covers; the hub
# rebuilds it from the JSON fields, so JSON spacing or key order never matters.
# docs/protocol.md is the specification and tests/vectors/ the test vectors.
import binascii
import hashlib
import json

PROTO = 1
KIND_VOTE = "v"
KIND_UNRATED = "u"
MAX_FIELD = 64
MAX_REASONS = 8
MAX_UPLINK = 2048  # bytes; the hub rejects larger uplink payloads unread

_BLOCK = 64


class CodecError(ValueError):
    """A message that does not follow docs/protocol.md."""


try:
    # CPython (the hub, the simulator's emulated devices): the C implementation; the
    # per-byte loop below was a seventh of the hub's ingest time.
    from hmac import digest as _c_hmac  # type: ignore[import-not-found]  # not on a device
except ImportError:
    _c_hmac = None


def hmac_sha256(key, msg):
    if _c_hmac is not None:
        return _c_hmac(key, msg, "sha256")
    # MicroPython ships no hmac module; RFC 2104 over hashlib.sha256 is a few lines. The
    # pads are filled in place: no generator and no per-byte objects on the device's heap.
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    ipad = bytearray(_BLOCK)
    opad = bytearray(_BLOCK)
    for i in range(_BLOCK):
        b = key[i] if i < len(key) else 0
        ipad[i] = b ^ 0x36
        opad[i] = b ^ 0x5C
    inner = hashlib.sha256(ipad)
    inner.update(msg)
    outer = hashlib.sha256(opad)
    outer.update(inner.digest())
    return outer.digest()


def to_hex(raw):
    return binascii.hexlify(raw).decode()


def from_hex(text):
    if len(text) % 2:
        raise CodecError("odd-length hex")
    try:
        return binascii.unhexlify(text)
    except ValueError:  # binascii.Error is a ValueError on CPython
        raise CodecError("bad hex")


def consteq(a, b):
    # Comparison time must not reveal how many leading MAC bytes were right.
    if len(a) != len(b):
        return False
    diff = 0
    for i in range(len(a)):
        diff |= a[i] ^ b[i]
    return diff == 0


def check_id(value, name, allow_empty=False):
    """Identifiers on the wire: 1..64 chars of A-Z a-z 0-9 . _ : -"""
    if not isinstance(value, str):
        raise CodecError(name + ": not a string")
    if not value:
        if allow_empty:
            return value
        raise CodecError(name + ": empty")
    if len(value) > MAX_FIELD:
        raise CodecError(name + ": too long")
    for ch in value:
        o = ord(ch)
        if not (48 <= o <= 57 or 65 <= o <= 90 or 97 <= o <= 122 or ch in "._:-"):
            raise CodecError(name + ": bad character")
    return value


def _check_int(value, name, lo, hi):
    # bool is an int subclass on CPython; a vote with "stars": true is malformed.
    if not isinstance(value, int) or isinstance(value, bool):
        raise CodecError(name + ": not an integer")
    if value < lo or value > hi:
        raise CodecError(name + ": out of range")
    return value


def canonical(vote):
    """The bytes the vote MAC covers (docs/protocol.md, "Canonical form")."""
    parts = (
        "pj1",
        vote["d"],
        str(vote["s"]),
        str(vote["t"]),
        vote["k"],
        vote["pid"],
        vote["case"],
        str(vote["stars"]),
        ",".join(vote["rs"]),
        vote["cv"],
        vote["w"],
        vote["sn"],
    )
    return "|".join(parts).encode()


def validate_vote(vote):
    """Raise CodecError unless vote has every field with the right type and range."""
    if not isinstance(vote, dict):
        raise CodecError("vote: not an object")
    proto = vote.get("v")
    # true and 1.0 compare equal to 1; only the integer 1 is this protocol.
    if not isinstance(proto, int) or isinstance(proto, bool) or proto != PROTO:
        raise CodecError("v: unsupported protocol version")
    check_id(vote.get("d"), "d")
    _check_int(vote.get("s"), "s", 1, 0xFFFFFFFF)
    _check_int(vote.get("t"), "t", 0, 0xFFFFFFFF)
    kind = vote.get("k")
    if kind not in (KIND_VOTE, KIND_UNRATED):
        raise CodecError("k: unknown kind")
    check_id(vote.get("pid"), "pid")
    check_id(vote.get("case"), "case", True)
    stars = _check_int(vote.get("stars"), "stars", 0, 5)
    reasons = vote.get("rs")
    if not isinstance(reasons, list) or len(reasons) > MAX_REASONS:
        raise CodecError("rs: not a list of at most 8 codes")
    for code in reasons:
        check_id(code, "rs")
    check_id(vote.get("cv"), "cv", True)
    check_id(vote.get("w"), "w", True)
    check_id(vote.get("sn"), "sn", True)
    if kind == KIND_VOTE:
        if stars < 1:
            raise CodecError("stars: a vote needs 1..5 stars")
        if stars <= 2 and not reasons:
            raise CodecError("rs: a bad rating needs at least one reason")
        if stars >= 3 and reasons:
            raise CodecError("rs: a good rating carries no reasons")
    elif stars != 0 or reasons:
        raise CodecError("stars: an unrated record has no stars or reasons")
    mac = vote.get("mac")
    if not isinstance(mac, str) or len(mac) != 64:
        raise CodecError("mac: not 64 hex digits")
    return vote


def make_vote(key, device_id, seq, t, kind, pid, case, stars, reasons, cat_ver, window, staff_no):
    """Build a signed vote dict (the journal stores encode_vote() of it)."""
    vote = {
        "v": PROTO,
        "d": device_id,
        "s": seq,
        "t": t,
        "k": kind,
        "pid": pid,
        "case": case,
        "stars": stars,
        "rs": list(reasons),
        "cv": cat_ver,
        "w": window,
        "sn": staff_no,
        "mac": "0" * 64,
    }
    validate_vote(vote)
    vote["mac"] = to_hex(hmac_sha256(key, canonical(vote)))
    return vote


def encode_vote(vote):
    return json.dumps(vote).encode()


def decode_json(payload, what="message"):
    """Parse an uplink/downlink payload into a dict or raise CodecError."""
    if len(payload) > MAX_UPLINK:
        raise CodecError(what + ": too large")
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeError, RuntimeError, MemoryError):
        # Nesting deeper than the parser copes with raises RecursionError (a RuntimeError)
        # on CPython and MemoryError on a small MicroPython heap; such a payload is
        # malformed, not a reason to crash.
        raise CodecError(what + ": not JSON")
    if not isinstance(obj, dict):
        raise CodecError(what + ": not an object")
    return obj


def decode_vote(payload):
    return validate_vote(decode_json(payload, "vote"))


def verify_vote(key, vote):
    """True when vote's MAC was made with key over its canonical form."""
    try:
        mac = from_hex(vote["mac"])
    except CodecError:
        return False
    return consteq(mac, hmac_sha256(key, canonical(vote)))


def encode_ack(seq):
    return json.dumps({"s": seq}).encode()


def decode_ack(payload):
    obj = decode_json(payload, "ack")
    _check_int(obj.get("s"), "s", 0, 0xFFFFFFFF)
    return obj["s"]
