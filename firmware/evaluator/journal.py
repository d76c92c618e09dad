# The device's power-loss-safe vote journal: append-only segment files in one directory.
# A vote is durable here before the citizen sees "thank you", and leaves only after the
# hub's cumulative ack covers it. Portable: MicroPython >= 1.22 and CPython >= 3.11.
# docs/journal.md specifies the record layout and the recovery rules.
#
# Kept deliberately small: the MicroPython test runner compiles this source inside a 64 KB
# heap, and the compiler's parse tree grows with every token.
import binascii
import os
import struct

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):  # type: ignore[misc]
        return x


_MAGIC = const(0xA5)
_HEAD = const(11)  # magic u8 | payload length u16 | seq u32 | t u32, little-endian
_OVERHEAD = const(15)  # header + CRC32 u32 over header and payload
_CHUNK = const(64)  # copy/checksum buffer: recovery never loads a whole segment
_U32 = const(0xFFFFFFFF)
_FMT = "<BHII"
_TMP = "cut.tmp"

_fsync = getattr(os, "fsync", None)
_open = getattr(os, "open", None)  # CPython: a directory is fsynced through a descriptor
# MicroPython has no os.replace; its rename already replaces (POSIX and LittleFS).
_replace = getattr(os, "replace", os.rename)


class JournalError(Exception):
    """The journal cannot do what was asked (a caller bug or a damaged journal)."""


class JournalFull(JournalError):
    """No room without dropping unsent records: the device must stop taking votes."""


def _default_sync(f):
    f.flush()
    if _fsync:
        _fsync(f.fileno())


class Journal:
    """Durable, ordered, append-only store of (seq, t, payload) records.

    self._segs holds [first_seq, records, bytes] per segment file, oldest first; the last
    one is the active segment appends go to.
    """

    def __init__(self, dirname, segments=16, segment_bytes=4096, sync=None, seq_floor=0):
        if segments < 2 or segment_bytes <= _OVERHEAD:
            # Rotation writes the new segment before it may delete the old one, or a power
            # cut in between would lose the next sequence number: two files at least.
            raise JournalError("need 2+ segments of 16+ bytes")
        self._dir = dirname
        self._cap = segments
        self._seg_bytes = segment_bytes
        self._max = min(segment_bytes - _OVERHEAD, 0xFFFF)
        self._sync = sync or _default_sync
        # Shared by append, recovery and readers: none keeps them across a yield.
        self._head = bytearray(_HEAD)
        self._crc = bytearray(4)
        self._buf = memoryview(bytearray(_CHUNK))
        self._segs = []
        # The sequence the next record gets, and the highest one the hub acked (plain
        # attributes, read-only for callers: a property costs the device's heap more).
        self.next_seq = 1
        self.acked = 0
        self._broken = False
        self.cut_bytes = 0
        self.recoveries = 0
        self.trim_failures = 0
        try:
            os.stat(dirname)
        except OSError:
            os.mkdir(dirname)
        self._recover(seq_floor)

    @property
    def depth(self):
        n = 0
        for first, count, _ in self._segs:
            n += max(0, min(count, first + count - 1 - self.acked))
        return n

    @property
    def oldest_seq(self):
        for first, count, _ in self._segs:
            if count and first + count - 1 > self.acked:
                return max(first, self.acked + 1)
        return None

    @property
    def oldest_t(self):
        # Read from the file (one record) rather than cached: asked once per heartbeat.
        for rec in self.unacked():
            return rec[1]
        return None

    def _path(self, first):
        return "%s/j%010d.log" % (self._dir, first)

    def _sync_dir(self):
        # A new or renamed file is durable only once its directory entry is (POSIX).
        # LittleFS commits metadata atomically, and MicroPython has no fsync anyway.
        if _open is None or _fsync is None:
            return
        try:
            fd = _open(self._dir, getattr(os, "O_RDONLY", 0))
        except OSError:
            return  # a platform that cannot open directories
        try:
            _fsync(fd)
        finally:
            getattr(os, "close")(fd)

    def _recover(self, floor):
        firsts = []
        for name in os.listdir(self._dir):
            if name == _TMP:
                # The power went during an earlier cut, before the rename: the segment is
                # still whole and its cut is simply redone below.
                os.remove(self._dir + "/" + name)
            elif (len(name) == 15 and name[0] == "j" and name[11:] == ".log"
                  and name[1:11].isdigit()):
                firsts.append(int(name[1:11]))  # "j%010d.log": the first seq it holds
        firsts.sort()
        end = 0  # the seq after the last good record so far
        for first in firsts:
            path = self._path(first)
            size = os.stat(path)[6]
            # A segment overlapping the one before cannot come from a power cut; keeping
            # it would repeat sequences, so all of it is cut.
            good, count = (0, 0) if first < end else self._scan(path, first, size)
            if good < size:
                self._cut(path, good)
                self.cut_bytes += size - good
                self.recoveries += 1
            if count or first == firsts[-1]:
                # The newest segment counts even when empty: its name is the next seq
                # after all its records were cut or acked.
                self._segs.append([first, count, good])
                end = max(end, first + count)
            else:
                os.remove(path)  # empty and not the newest: carries no sequence
        self.next_seq = max(end, floor, 1)

    def _scan(self, path, seq, size):
        """(bytes, records) of the valid prefix of one segment, checked chunk by chunk."""
        head = self._head
        buf = self._buf
        pos = count = 0
        with open(path, "rb") as f:
            while size - pos >= _OVERHEAD and f.readinto(head) == _HEAD:
                magic, n, rec_seq, _ = struct.unpack_from(_FMT, head)
                end = pos + _OVERHEAD + n
                if magic != _MAGIC or rec_seq != seq + count or end > size:
                    break
                crc = binascii.crc32(head)
                while n:
                    k = min(n, _CHUNK)
                    f.readinto(buf[:k])
                    crc = binascii.crc32(buf[:k], crc)
                    n -= k
                f.readinto(buf[:4])
                if struct.unpack_from("<I", buf)[0] != crc & _U32:
                    break
                pos = end
                count += 1
        return pos, count

    def _cut(self, path, good):
        # MicroPython files have no truncate(): copy the good prefix to a temp file, make
        # it durable, rename it over the segment (atomic on POSIX and LittleFS).
        tmp = self._dir + "/" + _TMP
        buf = self._buf
        try:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while good:
                    k = min(good, _CHUNK)
                    src.readinto(buf[:k])
                    dst.write(buf[:k])
                    good -= k
                self._sync(dst)
            _replace(tmp, path)
            self._sync_dir()
        except OSError as e:
            raise JournalError("cannot cut %s: %s" % (path, e))

    def _trim(self, dry=False):
        # Deletes the segments that may go: empty, or every record in it acked by the hub
        # -- never the active (newest) one: its name carries the next sequence number.
        # With dry, only says whether one may.
        for seg in self._segs[:-1]:
            if seg[0] + seg[1] - 1 <= self.acked or not seg[1]:
                if dry:
                    return True
                try:
                    os.remove(self._path(seg[0]))
                    self._segs.remove(seg)
                except OSError:
                    # Retried at the next ack or rotation; its records are acked, so at
                    # worst they are sent again and the hub acks them again.
                    self.trim_failures += 1
        return False

    def _new_segment(self, need):
        if not self._segs:
            return True
        first, count, size = self._segs[-1]
        return first + count != self.next_seq or size + need > self._seg_bytes

    def can_append(self, size):
        """Would a record with a payload of this many bytes fit right now?"""
        if size > self._max or self._broken or self.next_seq > _U32:
            return False
        segs = self._segs
        return (not self._new_segment(size + _OVERHEAD) or len(segs) < self._cap
                or self._trim(True))

    def append(self, seq, t, payload):
        """Store one record; returns only once it is durable (one write, one sync)."""
        n = len(payload)
        if seq != self.next_seq or seq > _U32 or not 0 <= t <= _U32 or n > self._max:
            raise JournalError("bad record: seq %d (next %d), %d bytes" % (seq, self.next_seq, n))
        if self._broken:
            # A flash fault, like the one that caused it: callers treat both alike.
            raise OSError(5, "journal damaged by a failed write: reopen it")
        need = n + _OVERHEAD
        new = self._new_segment(need)
        if new and len(self._segs) >= self._cap:
            self._trim()
            if len(self._segs) >= self._cap:
                raise JournalFull("journal full: %d unsent" % self.depth)
        head = self._head
        struct.pack_into(_FMT, head, 0, _MAGIC, n, seq, t)
        struct.pack_into("<I", self._crc, 0, binascii.crc32(payload, binascii.crc32(head)) & _U32)
        seg = [seq, 0, 0] if new else self._segs[-1]
        path = self._path(seg[0])
        try:
            with open(path, "ab") as f:
                f.write(head)
                f.write(payload)
                f.write(self._crc)
                self._sync(f)
            if new:
                self._sync_dir()
        except OSError as e:
            # Not stored. Part of the record may be in the file, and recovery would cut
            # every later record along with it: cut back to the last good byte now, then
            # let the caller see the flash fault itself.
            try:
                os.stat(path)
                self._cut(path, seg[2])
                if new:
                    self._segs.append(seg)  # an empty segment still names the next seq
            except OSError:
                pass  # never created: nothing to repair
            except JournalError:
                self._broken = True  # can_append() says no; reopening recovers
            raise e
        seg[1] += 1
        seg[2] += need
        self.next_seq = seq + 1
        if new:
            self._segs.append(seg)
            self._trim()

    def ack(self, seq):
        """The hub holds every record <= seq: trim whole segments. Returns records acked."""
        if seq <= self.acked or seq >= self.next_seq:
            return 0
        before = self.depth
        self.acked = seq
        self._trim()
        return before - self.depth

    def unacked(self, after=0):
        """Yield (seq, t, payload) of unacked records with seq > after, oldest first.

        One record per step, no file held open while suspended: appends and acks may come
        between steps (a record acked meanwhile is skipped).
        """
        head = self._head
        first = -1
        pos = seq = 0
        while True:
            floor = max(after, self.acked)
            seg = None
            for s in self._segs:
                if s[0] == first and max(seq, floor + 1) < first + s[1]:
                    seg = s  # carry on in the same segment
            if not seg:
                for s in self._segs:
                    if s[1] and s[0] > first and s[0] + s[1] - 1 > floor:
                        seg = s
                        break
                if not seg:
                    return
                first = seq = seg[0]
                pos = 0
            with open(self._path(first), "rb") as f:
                while True:
                    f.seek(pos)
                    f.readinto(head)
                    magic, n, rec_seq, t = struct.unpack_from(_FMT, head)
                    if magic != _MAGIC or rec_seq != seq:
                        raise JournalError("damaged segment %d" % first)
                    pos += _OVERHEAD + n
                    seq += 1
                    if rec_seq > floor:
                        break
                payload = f.read(n)
                f.readinto(self._crc)
            crc = binascii.crc32(payload, binascii.crc32(head)) & _U32
            if struct.unpack_from("<I", self._crc)[0] != crc:
                raise JournalError("bad CRC at seq %d" % rec_seq)
            after = rec_seq
            yield rec_seq, t, payload
