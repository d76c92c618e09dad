# The bad-rating catalogue (the `cat` downlink, docs/protocol.md) on the device's flash.
#
# The catalogue is the largest downlink (twelve reasons with their bitmaps: 4.3 KB of JSON,
# 11 KB of objects once parsed) and the reasons screen shows three of them at a time. So a
# device with a screen keeps it on flash: the MQTT client spools a catalogue too big for
# its receive buffer straight to cat.json, this module reads it one reason at a time into
# an index (codes and areas in RAM, each bitmap decoded once into cat.bin), and the app
# loads the bitmaps of the reasons on screen from cat.bin when the screen shows them.
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

    write() the new content in pieces, then close(): True when the file now holds other
    bytes than before. Until close(True) the old file stays as it was (the new bytes go to
    path + ".new", renamed over it); close(False) drops them.
    """

    def __init__(self, path):
        self.path = path
        try:
            self._old = open(path, "rb")
        except OSError:
            self._old = None
        self._new = None
        self._same = 0  # bytes so far that equal the old file's first bytes

    def write(self, data):
        old = self._old
        new = self._new
        if new is None:
            if old is not None and old.read(len(data)) == data:
                self._same += len(data)
                return
            new = self._divert()
        new.write(data)

    def _divert(self):
        # The content differs from here on: the new file starts with the equal prefix.
        new = self._new = open(self.path + ".new", "wb")
        old = self._old
        if self._same and old is not None:
            old.seek(0)
            left = self._same
            while left:
                chunk = old.read(min(left, _CHUNK))
                new.write(chunk)
                left -= len(chunk)
        return new

    def close(self, commit=True):
        old = self._old
        if self._new is None and commit and (old is None or old.read(1)):
            self._divert()  # the new content is the old one cut short (or there was none)
        if old is not None:
            old.close()
        new = self._new
        if new is None:
            return False
        new.close()
        if commit:
            os.rename(self.path + ".new", self.path)  # replaces: POSIX and LittleFS alike
        else:
            os.remove(self.path + ".new")
        return commit


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


class Catalogue:
    """The catalogue files in folder `folder`: cat.json (as received), cat.bin (bitmaps)."""

    def __init__(self, folder):
        self._json = folder + "/cat.json"
        self._bin = folder + "/cat.bin"
        self.cv = None  # version of the catalogue indexed since boot; None: none yet
        self.gen = 0  # bumps with every index: bitmaps of older ones no longer load

    def spool(self):
        """Where a received catalogue goes (write(), then close())."""
        return Spool(self._json)

    def index(self):
        """The catalogue in cat.json with no bitmaps in RAM, for Rating.set_catalogue().

        Each reason is {"c", "a"?, "bm": None, "f": ref}: ref locates its bitmap in cat.bin
        (load()). Returns (catalogue, spool of cat.bin) -- commit() it with the rating's
        verdict. Raises ValueError when the file is not a catalogue."""
        gen = self.gen + 1
        bins = Spool(self._bin)
        try:
            with open(self._json, "rb") as f:
                cv, spans = _scan(f)
                entries = []
                at = 0
                for start, end in spans:
                    f.seek(start)
                    entry = json.loads(f.read(end - start))
                    raw = bitmap(entry.get("bm"))  # ValueError if malformed
                    entry["bm"] = None
                    if raw is not None:
                        bins.write(raw)
                        # offset and length as one small int (no object): offsets fit in
                        # 16 bits (16 reasons of at most 2051 bytes), lengths in 12.
                        entry["f"] = (gen << 28) | (at << 12) | len(raw)
                        at += len(raw)
                    entries.append(entry)
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            bins.close(False)
            raise ValueError("cat")
        return {"cv": cv, "rs": entries}, bins

    def commit(self, bins, cat, ok):
        """The rating took `cat` (ok) or refused it: keep or drop its bitmaps."""
        bins.close(ok)
        if ok:
            self.cv = cat["cv"]
            self.gen += 1

    def load(self, ref):
        """The device bitmap a reason's "f" ref locates, or None (an older catalogue's)."""
        if ref >> 28 != self.gen:
            return None
        try:
            with open(self._bin, "rb") as f:
                f.seek((ref >> 12) & 0xFFFF)
                return f.read(ref & 0xFFF)
        except OSError:
            return None
