# The device's updater (docs/firmware.md, "Updates over the air"; the wire in
# docs/protocol.md): takes the hub's offer (dn/ota), fetches the image a chunk at a time
# (up/ota "get" -> dn/fw) into the app slot that is not running, checks it from flash
# (sha256, ROMFS with the entry module), installs it as a trial for the boot selector
# (firmware/bootsel.py) and resets; after that boot it confirms the trial once the hub has
# PUBACKed the birth and a heartbeat, or rolls back when the deadline passes first.
#
# The app imports this module only when an offer arrives, or at boot when ota.json has a
# trial to confirm or a rollback to report: a unit that is never updated never loads it.
# Memory is fixed and small: a chunk is written to the slot straight from the MQTT client's
# receive buffer, and the slot is hashed back from flash 256 bytes at a time through one
# buffer, a few KB per app tick, so the key scan and the votes never wait long. Votes
# first: the app sends what this module asks for only when no vote or event is waiting.
#
# Progress lives in dl.json ({"ver", "sha", "size", "got"}, rewritten every 8 KB and at the
# end): after a power cut the download resumes at "got". The download itself is not
# hashed; the whole slot is hashed from flash once every byte is in, which covers what a
# resume kept and proves the flash holds what arrived.
import hashlib
import json
import os
from binascii import hexlify

from bootsel import back, save, state
from evaluator import VERSION

try:
    from micropython import const
except ImportError:  # CPython: the core tests
    def const(x):  # type: ignore[misc]
        return x

_WAIT_MS = const(5000)  # no chunk this long after asking: ask again (counted)
_KEEP_EVERY = const(8192)  # dl.json is rewritten at least this often
_INSTALL_MS = const(2000)  # the "installed" report's PUBACK is waited for this long
_HASH_STEP = const(4096)  # slot bytes hashed per app tick (100 ms)
_PIECE = const(256)  # the one read buffer
_FILE = const(5)  # ROMFS record kinds: a file (name, then its data)
# The rating states in which a citizen is mid-vote: an install (a reset) waits them out.
_BUSY = const(("PROMPT", "REASONS", "SAVING"))

# Names. The device interns every distinct name its modules use, in pools on the heap; the
# running app leaves room for about twenty more before the port allocates another pool of
# 7 KB at once (docs/firmware.md, "Memory"). So the names here are, wherever one fits, names
# the app already interns: read/ack/tick/connected for the app's calls, the wire's keys
# (ver, sha, got) for attributes, _int for the varint reader, "good" for a verified image.


def _int(buf, i):
    # One ROMFS varint at buf[i]: (value, index after it).
    v = 0
    while True:
        b = buf[i]
        i += 1
        v = (v << 7) | (b & 0x7F)
        if not b & 0x80:
            return v, i


def _valid(read, size, name, buf):
    """True when the size bytes read(off, buf) returns are a ROMFS image (VfsRom's format)
    with the file `name` (bytes) at its top level. Reads through buf only."""
    try:
        if read(0, buf) < 4 or buf[0] != 0xD2 or buf[1] != 0xCD or buf[2] != 0x31:
            return False
        end, pos = _int(buf, 3)
        end += pos
        if end > size:
            return False
        while pos < end:
            read(pos, buf)
            kind, i = _int(buf, 0)
            n, i = _int(buf, i)
            if kind == _FILE:
                k, j = _int(buf, i)
                if k == len(name) and buf[j:j + k] == name:
                    return True
            pos += i + n
    except (IndexError, OSError):
        pass
    return False


def start(app):
    """The app's updater (the app calls this name, which it interns anyway)."""
    return Updater(app)


class Updater:
    """One device's update state, driven by the app: on() for dn/ota and dn/fw, read()
    and ack() from the uplink, tick() from the key scan's slower duties, connected() after
    the birth. (Method names the app already interns for other objects: the app's heap
    keeps one entry per distinct name.)"""

    def __init__(self, app):
        self.app = app
        st = state()
        a = st.get("a", 0)
        t = st.get("t")
        trial = t in (0, 1) and t != a
        # The trial's version while this boot is a trial not yet confirmed, else None.
        self.tv = (st.get("tv") or "?") if trial else None
        self.slot = t if trial else a  # the slot running now
        self.rb = st.get("rb")
        self.st = None  # None, "get", "hash", "good" (verified), "installed"
        self.ver = self.sha = None  # the offer being fetched
        self.bad = None  # the sha of an image refused in this boot: not fetched again
        self._out = None  # a report waiting for the uplink (bytes)
        self.h = None  # the sha256 of the slot while it is checked
        self._buf = None  # the one read buffer (_PIECE bytes), from the first check on
        self.size = self.got = 0  # the image's size; bytes of it in the slot
        self.pos = 0  # bytes hashed so far
        self._old = 0  # "got" as dl.json last recorded it
        self._since = 0  # when the last request went, or the install was written
        self.resends = 0  # requests repeated after _WAIT_MS without a chunk
        self.need = False  # a chunk request is due
        self._ttl_ms = 120000  # ms from boot for a trial to confirm: board.json can say less
        if trial:
            try:
                with open("board.json") as f:
                    self._ttl_ms = json.load(f)["ota"]["confirm_s"] * 1000
            except (OSError, ValueError, KeyError, TypeError):
                pass

    # ---- from the app ---------------------------------------------------------------------
    def on(self, kind, payload):
        """A downlink: the offer (dn/ota; empty withdraws it) or a chunk (dn/fw). A
        malformed offer raises ValueError/KeyError (the app counts it)."""
        if kind == "fw":
            self._chunk(payload)
            return
        if not len(payload):
            if self.st != "installed":
                self.st = None  # withdrawn: stop asking, keep dl.json for a new offer
            return
        msg = json.loads(payload)
        ver = msg["ver"]
        size = msg["size"]
        sha = msg["sha"]
        if (not isinstance(ver, str) or not isinstance(size, int) or not isinstance(sha, str)
                or len(sha) != 64 or size <= 0):
            raise ValueError("ota")
        if self.tv is not None or self.st == "installed":
            return  # the trial confirms (and reports) first; the reset comes first
        if ver == VERSION:
            self._send("ok", ver)
            return
        if ver == self.rb:
            self._send("rolledback", ver)
            return
        sha = sha.lower()
        if sha == self.bad or (sha == self.sha and self.st is not None):
            return  # refused already (the hub has the report), or on it already
        self.ver = ver
        self.sha = sha
        self.size = size
        self.got = 0
        try:
            with open("dl.json") as f:
                dl = json.load(f)
            if (dl["ver"] == ver and dl["sha"] == sha and dl["size"] == size
                    and 0 <= dl["got"] <= size):
                self.got = dl["got"]  # resumed after a power cut
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if not self.got:
            try:
                self.app.board.slot_begin(1 - self.slot, size)
            except ValueError:
                self.fail("bad", "size")  # bigger than the slot
                return
            except OSError:
                self.fail("err", "flash")
                return
            if not self.commit():
                return
        self._old = self.got
        self._new()

    def _chunk(self, p):
        if self.st != "get" or len(p) < 4:
            return
        off = (p[0] << 24) | (p[1] << 16) | (p[2] << 8) | p[3]
        if off != self.got:
            return  # not the chunk asked for (a late answer to an earlier request)
        n = len(p) - 4
        if not n or off + n > self.size:
            self.fail("bad", "size")
            return
        try:
            self.app.board.slot_write(1 - self.slot, off, p[4:])
        except OSError:
            self.fail("err", "flash")
            return
        self.got = off + n
        if (self.got - self._old >= _KEEP_EVERY or self.got == self.size) and not self.commit():
            return
        self._new()

    def read(self):
        """What the uplink should publish on up/ota next (bytes), or None. A chunk request
        counts as asked once handed over: its answer may come before its PUBACK, and one
        that never goes (the link dropped) is asked again after _WAIT_MS."""
        if self._out is not None:
            return self._out
        if self.st == "get" and self.need:
            self.need = False
            self._since = self.app.clock.ticks_ms()
            return json.dumps({"st": "get", "ver": self.ver, "off": self.got}).encode()
        return None

    def ack(self, msg):
        """msg (from read()) was PUBACKed: a report is done with; after "installed", the
        reset."""
        if msg is self._out:
            self._out = None
            if self.st == "installed":
                self.app.board.reset()

    async def connected(self, client):
        """After the birth's PUBACK: a trial sends one heartbeat with QoS 1 and, once that
        is PUBACKed too, is confirmed; a unit that rolled back says so on every connect."""
        app = self.app
        if self.tv is not None:
            await client.publish(app._up + "hb", app.heartbeat(), 1)
            save({"a": self.slot, "t": None, "n": 0})
            self.tv = None
            self.rb = None
            self._send("ok", VERSION)
        elif self.rb:
            self._send("rolledback", self.rb)

    def tick(self, now):
        """The timers: the trial's deadline, a chunk that never came, hashing the slot a
        step at a time, the install once no citizen is mid-vote, the reset after it."""
        app = self.app
        diff = app.clock.ticks_diff
        st = self.st
        if self.tv is not None:
            if diff(now, app._boot_ms) >= self._ttl_ms:
                save(back(state()))  # never reached the hub in time: the old slot again
                app.board.reset()
        elif st == "get":
            if not self.need and diff(now, self._since) >= _WAIT_MS:
                self.resends += 1
                self.need = True
                app._kicked = True
        elif st == "hash":
            self.step()
        elif st == "good":
            if app.rating.state not in _BUSY:
                self.install(now)
        elif st == "installed" and diff(now, self._since) >= _INSTALL_MS:
            app.board.reset()

    # ---- inside ---------------------------------------------------------------------------
    def _new(self):
        if self.got < self.size:
            self.st = "get"
            self.need = True
        else:
            self.st = "hash"
            self.pos = 0
            self.h = hashlib.sha256()
        self.app._kicked = True

    def commit(self):
        # dl.json, atomically; False (reported) when the flash refuses it.
        try:
            with open("ota.tmp", "w") as f:
                json.dump({"ver": self.ver, "sha": self.sha, "size": self.size,
                           "got": self.got}, f)
            os.rename("ota.tmp", "dl.json")
        except OSError:
            self.fail("err", "flash")
            return False
        self._old = self.got
        return True

    def step(self):
        # Hash up to _HASH_STEP more bytes of the slot from flash; at the end, judge it.
        board = self.app.board
        if self._buf is None:
            self._buf = bytearray(_PIECE)
        mv = memoryview(self._buf)
        n = 1 - self.slot
        end = min(self.pos + _HASH_STEP, self.size)
        try:
            while self.pos < end:
                k = board.slot_read(n, self.pos, mv if end - self.pos >= _PIECE
                                    else mv[:end - self.pos])
                if not k:
                    break  # the slot is shorter than the image: the hash tells
                self.h.update(mv[:k])  # type: ignore[union-attr]  # set by _new()
                self.pos += k
        except OSError:
            self.fail("err", "flash")
            return
        if self.pos < end:
            self.pos = self.size
        elif self.pos < self.size:
            return
        ok = hexlify(self.h.digest()).decode() == self.sha  # type: ignore[union-attr]
        self.h = None
        if not ok:
            self.fail("bad", "hash")
            return
        # The image must hold the entry module bootsel.py imports: PJ_ENTRY where the
        # launcher sets it (the simulator), "start" on a board.
        env = getattr(os, "getenv", None)
        env = (env("PJ_ENTRY") if env is not None else None) or "start"
        if _valid(lambda off, buf: board.slot_read(n, off, buf), self.size,
                  (env + ".mpy").encode(), self._buf):
            self.st = "good"
        else:
            self.fail("bad", "image")

    def install(self, now):
        try:
            save({"a": self.slot, "t": 1 - self.slot, "n": 0, "tv": self.ver, "rb": None})
        except OSError:
            self.fail("err", "flash")
            return
        try:
            os.remove("dl.json")
        except OSError:
            pass
        self.st = "installed"
        self._since = now
        self._send("installed", self.ver)

    def fail(self, st, why):
        self.st = None
        self.bad = self.sha
        self.h = None
        try:
            os.remove("dl.json")
        except OSError:
            pass
        self._out = json.dumps({"st": st, "ver": self.ver, "why": why}).encode()
        self.app._event({"e": "ota", "st": st, "ver": self.ver, "why": why})

    def _send(self, st, ver):
        self._out = json.dumps({"st": st, "ver": ver}).encode()
        self.app._event({"e": "ota", "st": st, "ver": ver})
        self.app._kicked = True
