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
#
# Heap: this module costs the app what its functions and objects take on the heap (each
# function some 100 bytes on the device, bytecode aside), so it has few of them: the work
# is done in on() (downlinks) and tick() (timers, the check, the install). It writes
# ota.json itself rather than importing bootsel.py (whose functions it would load too), in
# the same format, atomically. And every distinct name is interned for good in pools on the
# heap: the running app leaves room for about twenty more before the port allocates another
# pool of 7 KB at once (docs/firmware.md, "Memory"), so wherever one fits, a name here is one
# the app already interns: read/ack/tick/connected for the app's calls, the wire's keys
# (ver, sha, got) for attributes, _int for the varint reader, "good" for a verified image.
import json
import os

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


def _save(name, obj):
    # name (ota.json or dl.json) replaced whole by obj: written aside, then renamed over
    # it, so a power cut leaves the old file or the new (bootsel.py's save(), for both).
    with open("ota.tmp", "w") as f:
        json.dump(obj, f)
    sync = getattr(os, "sync", None)  # a board's, where the port has one
    if sync is not None:
        sync()
    os.rename("ota.tmp", name)


class start:
    """The updater: one device's update state, driven by the app: on() for dn/ota and
    dn/fw, read() and ack() from the uplink, tick() from the key scan's slower duties,
    connected() after the birth. (Named as the app calls it, ota.start(app): a name the
    app interns anyway, where "Updater" would be one more.)"""

    def __init__(self, app):
        self.app = app
        try:
            with open("ota.json") as f:
                st = json.load(f)
        except (OSError, ValueError):
            st = {}
        a = st.get("a", 0)
        t = st.get("t")
        trial = t in (0, 1) and t != a
        # The trial's version while this boot is a trial not yet confirmed, else None.
        self.tv = (st.get("tv") or "?") if trial else None
        self.slot = t if trial else a  # the slot running now
        self.rb = st.get("rb")  # the version rolled back, never fetched again
        self.st = None  # None, "get", "hash", "good" (verified), "installed"
        self.ver = self.sha = None  # the offer being fetched
        self.bad = None  # the sha of an image refused in this boot: not fetched again
        self._out = None  # a report waiting for the uplink (bytes)
        self.h = None  # the sha256 of the slot while it is checked
        self._buf = None  # the one read buffer (_PIECE bytes), from the first check on
        self.size = self.got = 0  # the image's size; bytes of it in the slot
        self.pos = 0  # bytes hashed so far
        self._old = 0  # "got" as dl.json last recorded it
        # When the last chunk request went (None: one is due), or the install was written;
        # on trial, the deadline (ms from boot): 120 s unless board.json says
        # "ota": {"ttl": N} (seconds; "ttl", a name the app has, like the prompts' ttl). (Few attributes: the 18th would double their table.)
        self._since = 120000  # type: int | None
        self.resends = 0  # requests repeated after _WAIT_MS without a chunk
        if trial:
            try:
                with open("board.json") as f:
                    self._since = json.load(f)["ota"]["ttl"] * 1000
            except (OSError, ValueError, KeyError, TypeError):
                pass

    def on(self, kind, p):
        """A downlink: the offer (dn/ota; empty withdraws it) or a chunk of the image
        (dn/fw: 4-byte big-endian offset, then bytes). A malformed offer raises
        ValueError/KeyError (the app counts it)."""
        board = self.app.board
        if kind == "fw":
            if self.st != "get" or len(p) < 4:
                return
            off = (p[0] << 24) | (p[1] << 16) | (p[2] << 8) | p[3]
            if off != self.got:
                return  # not the chunk asked for (a late answer to an earlier request)
            n = len(p) - 4
            if not n or off + n > self.size:
                self._send("bad", self.ver, "size")
                return
            try:
                board.slot_write(1 - self.slot, off, p[4:])
            except OSError:
                self._send("err", self.ver, "flash")
                return
            self.got = off + n
        elif not len(p):
            if self.st != "installed":
                self.st = None  # withdrawn: stop asking, keep dl.json for a new offer
            return
        else:
            msg = json.loads(p)
            ver = msg["ver"]
            size = msg["size"]
            sha = msg["sha"]
            if (not isinstance(ver, str) or not isinstance(size, int)
                    or not isinstance(sha, str) or len(sha) != 64 or size <= 0):
                raise ValueError("ota")
            if self.tv is not None or self.st == "installed":
                return  # the trial confirms (and reports) first; the reset comes first
            from evaluator import VERSION

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
            self.got = self._old = 0
            try:
                with open("dl.json") as f:
                    msg = json.load(f)
                if (msg["ver"] == ver and msg["sha"] == sha and msg["size"] == size
                        and 0 <= msg["got"] <= size):
                    self.got = self._old = msg["got"]  # resumed after a power cut
            except (OSError, ValueError, KeyError, TypeError):
                pass
            msg = None
            if not self.got:
                try:
                    board.slot_begin(1 - self.slot, size)
                except ValueError:
                    self._send("bad", ver, "size")  # bigger than the slot
                    return
                except OSError:
                    self._send("err", ver, "flash")
                    return
        got = self.got
        if not got or got == self.size or got - self._old >= _KEEP_EVERY:
            try:
                _save("dl.json", {"ver": self.ver, "sha": self.sha, "size": self.size,
                                  "got": got})
            except OSError:
                self._send("err", self.ver, "flash")
                return
            self._old = got
        if got < self.size:
            self.st = "get"
            self._since = None  # ask for the next chunk
        else:
            import hashlib

            self.st = "hash"
            self.pos = 0
            self.h = hashlib.sha256()
        self.app._kicked = True

    def read(self):
        """What the uplink should publish on up/ota next (bytes), or None. A chunk request
        counts as asked once handed over: its answer may come before its PUBACK, and one
        that never goes (the link dropped) is asked again after _WAIT_MS."""
        if self._out is not None:
            return self._out
        # While a citizen is mid-vote the download waits: the rating's screens take the
        # most heap, and a request, a chunk and its file write make garbage.
        if self.st == "get" and self._since is None and self.app.rating.state not in _BUSY:
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
            from evaluator import VERSION

            await client.publish(app._up + "hb", app.heartbeat(), 1)
            _save("ota.json", {"a": self.slot, "t": None, "n": 0})
            self.tv = self.rb = None
            self._send("ok", VERSION)
        elif self.rb:
            self._send("rolledback", self.rb)

    def tick(self, now):
        """The timers: the trial's deadline, a chunk that never came, hashing the slot a
        step at a time and judging it, the install once no citizen is mid-vote, the reset
        after it. Returns the offer (bytes) when the app should unload the updater until
        a vote is done, else None."""
        app = self.app
        board = app.board
        diff = app.clock.ticks_diff
        st = self.st
        if ((st == "get" or st == "hash") and self._out is None and self.tv is None
                and app.rating.state in _BUSY):
            # A citizen is voting mid-download: the app drops this module for as long as
            # the vote takes (its heap is the vote's) and keeps the offer returned here; it
            # offers it again once the rating is idle, and the download resumes at the
            # "got" recorded now.
            try:
                _save("dl.json", {"ver": self.ver, "sha": self.sha, "size": self.size,
                                  "got": self.got})
            except OSError:
                self._send("err", self.ver, "flash")
                return None
            return json.dumps({"ver": self.ver, "size": self.size, "sha": self.sha}).encode()
        if self.tv is not None:
            if diff(now, app._boot_ms) >= self._since:
                # Never reached the hub in time: the confirmed slot again (bootsel.py's
                # rollback state).
                _save("ota.json", {"a": 1 - self.slot, "t": None, "n": 0, "rb": self.tv})
                board.reset()
        elif st == "get":
            if self._since is not None and diff(now, self._since) >= _WAIT_MS:
                self.resends += 1
                self._since = None
                app._kicked = True
        elif st == "hash":
            # Up to _HASH_STEP more bytes of the slot from flash; at the end, judge it.
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
                        # The slot is shorter than the image: the hash tells.
                        self.pos = self.size
                        break
                    self.h.update(mv[:k])  # type: ignore[union-attr]  # set by on()
                    self.pos += k
            except OSError:
                self._send("err", self.ver, "flash")
                return
            if self.pos < self.size:
                return
            from binascii import hexlify

            if hexlify(self.h.digest()).decode() != self.sha:  # type: ignore[union-attr]
                self._send("bad", self.ver, "hash")
                return
            self.h = None
            # The image must hold the entry module bootsel.py imports: PJ_ENTRY where the
            # launcher sets it (the simulator), "start" on a board.
            env = getattr(os, "getenv", None)
            env = (env("PJ_ENTRY") if env is not None else None) or "start"
            if _valid(lambda off, buf: board.slot_read(n, off, buf), self.size,
                      (env + ".mpy").encode(), self._buf):
                self.st = "good"
            else:
                self._send("bad", self.ver, "image")
            self._buf = None
        elif st == "good":
            if app.rating.state not in _BUSY:
                try:
                    _save("ota.json", {"a": self.slot, "t": 1 - self.slot, "n": 0,
                                       "tv": self.ver, "rb": None})
                except OSError:
                    self._send("err", self.ver, "flash")
                    return
                try:
                    os.remove("dl.json")
                except OSError:
                    pass
                self.st = "installed"
                self._since = now
                self._send("installed", self.ver)
        elif st == "installed" and diff(now, self._since) >= _INSTALL_MS:
            board.reset()

    def _send(self, st, ver, why=None):
        # Queue the report {"st", "ver"[, "why"]} for the uplink (the newest replaces one not
        # yet sent) and tell the simulator. A failure ("bad", "err") ends this download
        # without installing, and its image is not fetched again in this boot.
        msg = {"st": st, "ver": ver}
        if why is not None:
            msg["why"] = why
            self.st = None
            self.bad = self.sha
            self.h = None
            try:
                os.remove("dl.json")
            except OSError:
                pass
        self._out = json.dumps(msg).encode()
        msg["e"] = "ota"
        self.app._event(msg)
        self.app._kicked = True

