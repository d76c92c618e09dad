# The bad-rating catalogue (the `cat` downlink, docs/protocol.md) on the device's flash.
#
# The catalogue is the largest downlink (twelve reasons with their bitmaps: 4.3 KB of JSON,
# 11 KB of objects once parsed), used only for bad ratings, and the reasons screen shows
# three reasons at a time. So a device with a screen keeps it on flash: the MQTT client
# spools a catalogue too big for its receive buffer straight to cat.json; this module
# checks it one reason at a time and decodes each bitmap once into cat.bin; the rating
# reads the reasons from flash when a bad rating opens them; and the app loads the bitmaps
# of the reasons on screen from cat.bin while the screen shows them.
#
# Flash wear: every file is written compare-or-write (Spool). The hub sends the same
# retained catalogue on every reconnect; that rewrites nothing.
import json
import os

from display import bitmap

from micropython import const  # MicroPython only: no fallback to load

_CHUNK = const(64)  # bytes read per step when scanning or copying
_TEXT = const(80)  # longest top-level string kept while scanning (cv is 64 at most)
_QUOTE = const(34)
_BACKSLASH = const(92)


class Spool:
    """Bytes that replace the file at `path` only if they differ (compare-or-write).

    write() the new content in pieces, then close(): True when it differs from the file's.
    The file itself stays as it was until settle(path, True) renames the new content (in
    path + ".new") over it.
    """

    def __init__(self, path):
        self.path = path
        try:
            self._old = open(path, "rb")
        except OSError:
            self._old = None
        self._new = None
        self._same = 0  # bytes so far that equal the old file's first bytes
        self._scratch = bytearray(_CHUNK)

    def write(self, data):
        new = self._new
        if new is None:
            # Compared 64 bytes at a time against the old file: no big buffer on the heap.
            mv = memoryview(data)
            i = 0
            old = self._old
            if old is not None:
                scratch = memoryview(self._scratch)
                while i < len(mv):
                    k = min(_CHUNK, len(mv) - i)
                    if old.readinto(scratch[:k]) != k or scratch[:k] != mv[i:i + k]:
                        break
                    i += k
            self._same += i
            if i == len(mv):
                return
            new = self._divert()
            data = mv[i:]
        new.write(data)

    def _divert(self):
        # The content differs from here on: the new file starts with the equal prefix.
        new = self._new = open(self.path + ".new", "wb")
        old = self._old
        if self._same and old is not None:
            old.seek(0)
            left = self._same
            scratch = memoryview(self._scratch)
            while left:
                k = old.readinto(scratch[:min(left, _CHUNK)])
                new.write(scratch[:k])
                left -= k
        return new

    def close(self):
        """True when the content differs from the file's: it waits at path + ".new" for
        settle(path, ok). False: the same bytes, nothing written."""
        old = self._old
        if self._new is None and (old is None or old.read(1)):
            self._divert()  # the new content is the old one cut short (or there was none)
        if old is not None:
            old.close()
        if self._new is None:
            return False
        self._new.close()
        return True


def settle(path, ok):
    """Put the content waiting at path + ".new" in place (ok), or drop it."""
    if ok:
        os.rename(path + ".new", path)  # replaces: POSIX and LittleFS alike
    else:
        os.remove(path + ".new")


def _scan(f):
    # One pass over {"cv": "...", "rs": [{...}, ...], ...} (any key order and spacing):
    # the cv string and the byte span of every rs element. Only the structure is checked
    # here (balanced, strings closed, rs a list of objects, nothing after the object);
    # each element is parsed by json on its own later, and the rating checks the rest.
    buf = bytearray(_CHUNK)
    text = bytearray(_TEXT)  # a top-level string being read (a key, or cv), bounded
    tlen = 0
    depth = pos = 0
    in_str = esc = done = False
    key = 0  # the top-level key in force: 1 "cv", 2 "rs", 0 another
    want_key = False
    cv = None
    spans = []
    start = -1
    listed = False  # rs was a list
    while True:
        n = f.readinto(buf)
        if not n:
            break
        for i in range(n):
            c = buf[i]
            if in_str:
                if esc:
                    esc = False
                elif c == _BACKSLASH:
                    esc = True
                elif c == _QUOTE:
                    in_str = False
                    if depth == 1 and want_key:
                        key = 1 if text[:tlen] == b"cv" else (2 if text[:tlen] == b"rs" else 0)
                    elif depth == 1 and key == 1:
                        cv = bytes(text[:tlen]).decode()
                elif depth == 1 and tlen < _TEXT:
                    text[tlen] = c
                    tlen += 1
                continue
            if c in b" \t\r\n":
                continue
            if done or (depth == 0 and c != 123) or (depth == 2 and key == 2 and c != 123
                                                       and c != 44 and c != 93):
                raise ValueError("cat")  # after the object, not an object, not a reason
            if c == _QUOTE:
                in_str = True
                tlen = 0
            elif c == 123 or c == 91:  # { [
                depth += 1
                if depth == 1:
                    want_key = True
                elif depth == 2 and key == 2:
                    listed = c == 91
                elif depth == 3 and key == 2:
                    start = pos + i
            elif c == 125 or c == 93:  # } ]
                if depth == 3 and key == 2:
                    spans.append((start, pos + i + 1))
                depth -= 1
                done = depth == 0
            elif depth == 1:
                want_key = c == 44  # , (a key follows) or : (its value)
        pos += n
    if not done or not listed:
        raise ValueError("cat")
    return cv, spans


def _reason(c, a, f):
    # A reason as the rating and the screen use it: a small dict, its area the interned
    # word rather than a string of its own.
    a = "item" if a == "item" else ("staff" if a == "staff" else a)
    return {"c": c, "a": a, "bm": None, "f": f}


class Catalogue:
    """The catalogue files in folder `path`: cat.json (as received), cat.bin (its bitmaps,
    decoded) and cat.idx (its reasons without bitmaps). Once the rating took a catalogue, the app hands the rating this
    object as the catalogue itself: catalogue["rs"] reads the reasons from flash when a
    bad rating needs them, so between bad ratings none of it is in RAM."""

    def __init__(self, path):
        # path: the folder the files go in
        self._json = path + "/cat.json"
        self._bin = path + "/cat.bin"
        self._idx = path + "/cat.idx"
        self.cv = None  # version of the catalogue in use; None: none taken since boot
        self.gen = 0  # bumps with every catalogue taken: older bitmaps no longer load

    def spool(self):
        """Where a received catalogue goes: write() it, then close()."""
        return Spool(self._json)

    def index(self, changed):
        """The catalogue just spooled (changed) or the one on flash, for the rating to
        check, and whether its bitmaps differ from those on flash: (catalogue, fresh).
        Settle with commit(). Raises ValueError, pending files dropped, for a bad one.

        One reason at a time: a structural scan of the file finds each reason's bytes and
        json parses that reason alone, so at most one reason's text is on the heap. Each
        bitmap is checked, decoded into cat.bin, and its place there goes into the
        reason's "f" ref."""
        bins = Spool(self._bin)
        gen = self.gen + 1
        try:
            with open(self._json + ".new" if changed else self._json, "rb") as f:
                cv, spans = _scan(f)
                entries = []
                at = 0
                for start, end in spans:
                    f.seek(start)
                    entry = json.loads(f.read(end - start))
                    raw = bitmap(entry.get("bm"))  # ValueError if malformed
                    entry = _reason(entry.get("c"), entry.get("a"), None)
                    if raw is not None:
                        bins.write(raw)
                        # Offset and length as one small int (no object): offsets fit
                        # in 16 bits (16 reasons of at most 2051 bytes), lengths in 12.
                        entry["f"] = (gen << 28) | (at << 12) | len(raw)
                        at += len(raw)
                    entries.append(entry)
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            if bins.close():
                settle(self._bin, False)
            if changed:
                settle(self._json, False)
            raise ValueError("cat")
        return {"cv": cv, "rs": entries}, bins.close()

    def commit(self, ok, changed, fresh, cat):
        """The rating took the catalogue index() read (ok) or refused it. Taken, its
        reasons without their bitmaps also go to cat.idx: what a bad rating reads."""
        if changed:
            settle(self._json, ok)
        if fresh:
            settle(self._bin, ok)
        if ok:
            rows = []
            for e in cat["rs"]:
                f = e["f"]
                rows.append([e["c"], e["a"], None if f is None else f & 0xFFFFFFF])
            sp = Spool(self._idx)
            sp.write(json.dumps([cat["cv"], rows]).encode())
            if sp.close():
                settle(self._idx, True)
            self.cv = cat["cv"]
            self.gen += 1

    def __getitem__(self, key):
        # What the rating reads of its catalogue: "cv", and "rs" when a bad rating opens
        # the reasons (each {"c", "a", "bm": None, "f": ref or None}), from cat.idx: a few
        # hundred bytes, no bitmaps. A flash that fails here leaves the citizen the
        # built-in reasons rather than no vote.
        if key == "cv":
            return self.cv
        try:
            with open(self._idx) as f:
                rows = json.load(f)[1]
        except (OSError, ValueError, IndexError):
            return []
        gen = self.gen << 28
        out = []
        for c, a, f in rows:
            out.append(_reason(c, a, None if f is None else gen | f))
        return out

    def load(self, f):
        """The device bitmap a reason's "f" ref locates, or None (an older catalogue's)."""
        if f >> 28 != self.gen:
            return None
        try:
            with open(self._bin, "rb") as fd:
                fd.seek((f >> 12) & 0xFFFF)
                return fd.read(f & 0xFFF)
        except OSError:
            return None
