# Vote journal: durable appends, recovery from a power cut at any byte, acks, capacity.
# Plain functions and asserts: pytest runs them under CPython, tests/core/run.py under
# MicroPython in a 64 KB heap, which compiles this whole file at once: keep it lean.
# Temp dirs come from TMPDIR (MicroPython has no tempfile module).
import os

from evaluator.journal import Journal, JournalError, JournalFull

R = 21  # bytes of one record holding _vote(1..9): 15 bytes overhead + 6 bytes payload


def _dir():
    d = (os.getenv("TMPDIR") or "/tmp") + "/pj-j-" + "".join("%02x" % b for b in os.urandom(6))
    os.mkdir(d)
    return d


def _clear(d):
    for name in os.listdir(d):
        os.remove(d + "/" + name)


def _rm(*dirs):
    for d in dirs:
        _clear(d)
        os.rmdir(d)


def _file(d, first, data=None):
    # Reads segment `first` of journal dir d, or writes it when data is given.
    with open(d + "/j%010d.log" % first, "wb" if data is not None else "rb") as f:
        return f.write(data) if data is not None else f.read()


def _names(d):
    return sorted(int(n[1:11]) for n in os.listdir(d) if n.endswith(".log"))


def _seqs(j, after=0):
    return [rec[0] for rec in j.unacked(after)]


def _vote(seq):
    return ("vote-%d" % seq).encode()


def _fill(j, upto, start=1):
    for seq in range(start, upto + 1):
        j.append(seq, 100 + seq, _vote(seq))
    return j


def _raises(exc, fn, *args):
    try:
        fn(*args)
    except exc as e:
        return type(e)
    return None


def test_sequences_are_contiguous_from_1_survive_reboot_and_never_repeat():
    d = _dir()
    try:
        j = Journal(d, segments=4, segment_bytes=2 * R)
        assert (j.next_seq, j.depth, j.oldest_seq, j.oldest_t, j.acked) == (1, 0, None, None, 0)
        _fill(j, 7)
        j = Journal(d, segments=4, segment_bytes=2 * R)  # reboot
        assert (j.next_seq, j.depth, j.cut_bytes, j.recoveries) == (8, 7, 0, 0)
        assert _seqs(j) == [1, 2, 3, 4, 5, 6, 7] and _names(d) == [1, 3, 5, 7]
        assert j.ack(7) == 7 and _names(d) == [7]  # never the active segment
        j = Journal(d, segments=4, segment_bytes=2 * R)
        j.append(8, 8, b"x")
        assert j.acked == 0 and _seqs(j) == [7, 8]  # acks are not persisted: 7 is re-sent
    finally:
        _rm(d)


def test_seq_floor_and_the_newest_segment_name_set_the_next_seq():
    d = _dir()
    try:
        j = Journal(d, seq_floor=500)
        assert j.next_seq == 500
        _fill(j, 501, 500)
        assert Journal(d, seq_floor=10).next_seq == 502  # a lower floor is moot
        _fill(Journal(d, seq_floor=900), 900, 900)
        assert _names(d) == [500, 900]  # a jump starts a new segment: each stays contiguous
        _file(d, 1000, b"")  # created at rotation, then the power went
        j = Journal(d)
        assert j.next_seq == 1000 and _seqs(j) == [500, 501, 900]
    finally:
        _rm(d)


def test_recovery_after_a_cut_at_every_byte_of_the_last_two_records():
    src, work = _dir(), _dir()
    try:
        votes = [b"a", "好".encode(), b"", b"vote-4", "差评".encode()]
        j = Journal(src)
        ends = []
        for i in range(5):
            j.append(i + 1, 70 + i, votes[i])
            ends.append(len(_file(src, 1)))
        data = _file(src, 1)
        for cut in range(ends[2], len(data) + 1):
            _clear(work)
            _file(work, 1, data[:cut])
            kept = len([e for e in ends if e <= cut])
            want = [(i + 1, 70 + i, votes[i]) for i in range(kept)]
            j = Journal(work)
            assert list(j.unacked()) == want and j.next_seq == kept + 1, cut
            assert (j.cut_bytes, j.recoveries) == (cut - ends[kept - 1], int(cut > ends[kept - 1]))
            assert len(_file(work, 1)) == ends[kept - 1]
            j.append(kept + 1, 9, b"after")
            j = Journal(work)
            assert list(j.unacked()) == want + [(kept + 1, 9, b"after")] and not j.recoveries
    finally:
        _rm(src, work)


def test_a_flipped_byte_cuts_its_segment_from_the_damaged_record_on():
    src, work = _dir(), _dir()
    try:
        _fill(Journal(src), 4)
        data = _file(src, 1)
        # magic, length, seq, t, payload, CRC of record 4; payload of record 2; magic of 1
        for at, kept in ((63, 3), (64, 3), (66, 3), (70, 3), (74, 3), (83, 3), (33, 1), (0, 0)):
            _clear(work)
            raw = bytearray(data)
            raw[at] ^= 0x40
            _file(work, 1, bytes(raw))
            _file(work, 9, b"")  # and a later (empty) segment survives it
            j = Journal(work)
            assert _seqs(j) == list(range(1, kept + 1)) and j.cut_bytes == 4 * R - kept * R, at
            assert j.next_seq == 9 and j.recoveries == 1
            assert _names(work) == [1, 9][not kept:]  # an emptied older segment is removed
        with open(work + "/cut.tmp", "wb") as f:  # the power went while cutting
            f.write(data)
        Journal(work)
        assert "cut.tmp" not in os.listdir(work)
    finally:
        _rm(src, work)


def test_a_full_journal_refuses_votes_loses_nothing_and_takes_votes_after_an_ack():
    d = _dir()
    try:
        j = _fill(Journal(d, segments=2, segment_bytes=2 * R), 4)
        assert not j.can_append(6)
        assert _raises(JournalError, j.append, 5, 5, b"vote-5") is JournalFull
        assert j.next_seq == 5 and _seqs(j) == [1, 2, 3, 4]
        assert j.ack(1) == 1 and not j.can_append(6)  # segment 1 still holds seq 2
        assert j.ack(2) == 1 and j.can_append(6) and _names(d) == [3]
        j.append(5, 5, b"vote-5")
        assert _seqs(Journal(d, segments=2)) == [3, 4, 5]
    finally:
        _rm(d)


def test_append_takes_only_the_next_seq_and_records_that_fit_a_segment():
    d = _dir()
    try:
        j = Journal(d, segment_bytes=64)
        j.append(1, 1, b"a")
        for bad in ((1, 1, b"x"), (3, 1, b"x"), (2, -1, b"x"), (2, 1, bytes(50))):
            assert _raises(JournalError, j.append, *bad) is JournalError, bad
        assert j.can_append(49) and not j.can_append(50)
        j.append(2, 1, bytes(49))
        assert _seqs(Journal(d)) == [1, 2]
    finally:
        _rm(d)


def test_ack_trims_whole_segments_only_and_ignores_stale_and_future_acks():
    d = _dir()
    try:
        j = _fill(Journal(d, segment_bytes=3 * R), 7)
        assert _names(d) == [1, 4, 7]
        assert j.ack(8) == 0 and j.acked == 0  # beyond anything sent
        assert j.ack(4) == 4 and _names(d) == [4, 7]  # 5 and 6 are not acked yet
        assert (j.depth, j.oldest_seq, j.oldest_t, j.acked) == (3, 5, 105, 4)
        assert j.ack(3) == 0 and j.ack(4) == 0 and j.acked == 4
        assert j.ack(7) == 3 and (j.depth, j.oldest_seq, j.oldest_t) == (0, None, None)
        assert Journal(d).oldest_t == 107
    finally:
        _rm(d)


def test_unacked_after_iterates_in_order_while_votes_and_acks_arrive():
    d = _dir()
    try:
        j = _fill(Journal(d, segment_bytes=2 * R), 6)
        assert _seqs(j, 3) == [4, 5, 6] and _seqs(j, 6) == []
        seen = []
        for seq, t, vote in j.unacked(1):
            assert vote == _vote(seq) and t == 100 + seq
            seen.append(seq)
            if seq == 2:
                j.ack(4)  # the hub got 3 and 4 another way: skipped, not sent again
            if seq == 6:
                j.append(7, 107, _vote(7))  # a vote during a replay is picked up
        assert seen == [2, 5, 6, 7]
        walk = j.unacked()
        assert next(walk)[0] == 5
        j.ack(6)  # deletes the file the suspended reader was in
        assert [rec[0] for rec in walk] == [7]
    finally:
        _rm(d)


def test_payloads_round_trip_byte_exact_including_utf8():
    d = _dir()
    try:
        votes = ['{"note":"非常满意"}'.encode(), "生僻字 𠀀 龘".encode(), bytes(range(256))]
        j = Journal(d)
        for i in range(3):
            j.append(i + 1, 1700000000 + i, votes[i])
        assert list(Journal(d).unacked()) == [(i + 1, 1700000000 + i, votes[i]) for i in range(3)]
    finally:
        _rm(d)


def test_each_vote_is_one_append_and_one_sync_and_a_failed_one_is_cut_back():
    d = _dir()
    try:
        syncs = []

        def sync(f):
            f.flush()
            syncs.append(1)
            if len(syncs) in (3, 6, 7):
                raise OSError(5)  # vote 3 fails, its repair works; vote 4 and its repair fail

        j = Journal(d, sync=sync)
        _fill(j, 2)
        assert len(syncs) == 2 and len(_file(d, 1)) == 2 * R  # appended, never rewritten
        assert _raises(OSError, j.append, 3, 3, b"lost") is OSError  # not stored
        assert j.next_seq == 3 and len(_file(d, 1)) == 2 * R
        j.append(3, 3, b"kept")
        assert [rec[2] for rec in Journal(d).unacked()] == [b"vote-1", b"vote-2", b"kept"]
        assert _raises(OSError, j.append, 4, 4, b"x") is OSError and not j.can_append(1)
        assert _raises(OSError, j.append, 4, 4, b"x") is OSError  # until reopened
        j = Journal(d)
        assert _seqs(j)[:3] == [1, 2, 3] and j.next_seq == _seqs(j)[-1] + 1
        j.append(j.next_seq, 5, b"y")
    finally:
        _rm(d)
