# Device timings under the MicroPython unix port, run by simulator/bench_device.py as
#
#   micropython -X heapsize=64wK bench_device_mp.py WORKDIR APPENDS SEGMENTS SEGMENT_BYTES
#
# with the compiled firmware (.mpy, the bytecode a board runs) on MICROPYPATH. Prints one
# JSON line. Times are microseconds from time.ticks_us(); each figure is the median (and
# p99) over many operations, next to its baseline measured in the same VM, the two
# alternating operation by operation:
#
# - sign: codec.make_vote + encode_vote of a typical vote (HMAC-SHA256 over the canonical
#   form, then the JSON payload);
# - append: Journal.append of that payload, synced the way the simulated board syncs
#   (flush to the host kernel), acked right after as the hub would, so segments rotate;
#   baseline: the same bytes appended to a plain file (open "ab", write, flush, close);
# - recover: opening a full journal (every segment written, nothing acked), which is what
#   a device does at boot; baseline: reading every byte of the same files in 64-byte
#   reads, the journal's own chunk size.
import gc
import json
import os
import sys
import time

from evaluator import codec
from evaluator.journal import Journal, JournalFull

KEY = bytes(range(32))


def flush(f):
    f.flush()


def rmtree(path):
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        os.remove(path + "/" + name)
    os.rmdir(path)


def stats(samples):
    samples.sort()
    n = len(samples)
    return {"median_us": samples[n // 2], "p99_us": samples[min(n - 1, (n * 99) // 100)],
            "n": n}


def vote(seq):
    return codec.encode_vote(codec.make_vote(
        KEY, "D001", seq, 1763712000 + seq, "v", "P%d" % seq, "GD2026-%06d" % seq, 5, [], "",
        "W001", "10001"))


def main(workdir, appends, segments, seg_bytes):
    out = {}
    # Signing.
    times = []
    for seq in range(1, 101):
        t0 = time.ticks_us()
        payload = vote(seq)
        times.append(time.ticks_diff(time.ticks_us(), t0))
    out["sign"] = stats(times)
    out["payload_bytes"] = len(payload)

    # Append + sync, acked as we go (steady state: segments rotate and get deleted), each
    # append followed by its baseline, the same bytes appended to a plain file: both see the
    # same moment of a shared machine.
    jdir = workdir + "/steady"
    rmtree(jdir)
    journal = Journal(jdir, segments, seg_bytes, sync=flush)
    path = workdir + "/plain.log"
    try:
        os.remove(path)
    except OSError:
        pass
    times = []
    plain = []
    for seq in range(1, appends + 1):
        payload = vote(seq)
        t0 = time.ticks_us()
        journal.append(seq, 1763712000 + seq, payload)
        times.append(time.ticks_diff(time.ticks_us(), t0))
        journal.ack(seq)
        t0 = time.ticks_us()
        with open(path, "ab") as f:
            f.write(payload)
            f.flush()
        plain.append(time.ticks_diff(time.ticks_us(), t0))
    out["append"] = stats(times)
    out["plain_append"] = stats(plain)

    # A full journal: append without acks until it refuses.
    jdir = workdir + "/full"
    rmtree(jdir)
    journal = Journal(jdir, segments, seg_bytes, sync=flush)
    seq = 1
    try:
        while True:
            journal.append(seq, 1763712000 + seq, vote(seq))
            seq += 1
    except JournalFull:
        pass
    out["full_records"] = seq - 1
    out["full_bytes"] = sum(os.stat(jdir + "/" + name)[6] for name in os.listdir(jdir))
    journal = None
    buf = bytearray(64)
    times = []
    plain = []
    for _ in range(9):
        # Recovery, then its baseline: every byte of the same files in 64-byte reads.
        gc.collect()
        t0 = time.ticks_us()
        journal = Journal(jdir, segments, seg_bytes, sync=flush)
        times.append(time.ticks_diff(time.ticks_us(), t0))
        if journal.depth != out["full_records"]:
            raise SystemExit("recovered %d of %d records" % (journal.depth, out["full_records"]))
        journal = None
        gc.collect()
        t0 = time.ticks_us()
        for name in sorted(os.listdir(jdir)):
            with open(jdir + "/" + name, "rb") as f:
                while f.readinto(buf):
                    pass
        plain.append(time.ticks_diff(time.ticks_us(), t0))
    out["recover"] = stats(times)
    out["plain_read"] = stats(plain)
    print(json.dumps(out))


main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
