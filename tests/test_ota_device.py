# Over-the-air updates on the device (firmware/ota.py, firmware/bootsel.py): real simulated
# devices (the MicroPython unix port, booted from their app slots by the boot selector;
# the heap test at the board's 64 KB taken literally, -X heapsize=64K, the others at the
# simulator's 64wK) against a real mosquitto and a test-side hub (paho) that offers an image
# and serves its chunks as docs/protocol.md's update section says -- or misbehaves on
# purpose. Images come from simulator/build.py's build_image, good or broken.
import asyncio
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time

import pytest

from simulator import build as fwbuild
from simulator.fleet import DEFAULT_HEAP
from test_app import DEVICE, HEAP, WINDOW, FakeHub
from test_app import run as app_run

OLD = "0.1.0"  # what the sources say today: every fresh unit runs it
CHUNK = 1024


@pytest.fixture(scope="module")
def images():
    """Release images by version: a good 0.2.0, a 0.3.0 that crashes at import, a 0.4.0
    and a 0.5.0 that never reach the hub. Built once for the module."""
    out = tempfile.mkdtemp(prefix="pj-ota-images-")
    try:
        made = {}
        for version, variant in (("0.2.0", "good"), ("0.3.0", "crash"), ("0.4.0", "mute"),
                                 ("0.5.0", "mute")):
            path, sha, size = fwbuild.build_image(version, out, variant)
            with open(path, "rb") as f:
                image = f.read()
            assert hashlib.sha256(image).hexdigest() == sha and len(image) == size
            made[version] = (version, image)
        yield made
    finally:
        shutil.rmtree(out, ignore_errors=True)


class OtaHub(FakeHub):
    """FakeHub plus the update side: a retained offer per device, chunks served on request
    (until `serving` is cleared), and every up/ota report kept in order."""

    def __init__(self, port, keys):
        self.reports = []
        self.images = {}  # device -> image bytes being offered
        self.serving = threading.Event()
        self.serving.set()
        self.serve_below = None  # serve only chunks below this offset, when set
        self.births_fw = []
        super().__init__(port, keys)

    def offer(self, device_id, version, image, sha=None):
        self.images[device_id] = image
        self.send(device_id, "ota", {"ver": version, "size": len(image),
                                     "sha": sha or hashlib.sha256(image).hexdigest(),
                                     "rid": "R1"}, retain=True)

    def withdraw(self, device_id):
        info = self.client.publish("pj/%s/dn/ota" % device_id, b"", qos=1, retain=True)
        info.wait_for_publish(5)

    def got(self, st):
        with self.lock:
            return [r for r in self.reports if r.get("st") == st]

    def _on_message(self, client, userdata, msg):
        parts = msg.topic.split("/")
        device_id, kind = parts[1], parts[-1]
        if kind == "birth":
            self.births_fw.append(json.loads(msg.payload)["fw"])
        if kind != "ota":
            super()._on_message(client, userdata, msg)
            return
        report = json.loads(msg.payload)
        with self.lock:
            self.reports.append(report)
        if report.get("st") != "get" or not self.serving.is_set():
            return
        off = report["off"]
        if self.serve_below is not None and off >= self.serve_below:
            return
        image = self.images[device_id]
        self.client.publish("pj/%s/dn/fw" % device_id,
                            off.to_bytes(4, "big") + image[off:off + CHUNK], qos=1)


def run_device(mosquitto, scenario, confirm_s=None, heap=DEFAULT_HEAP):
    """test_app's run() with the OtaHub, starting from a unit on OLD."""
    async def from_old(fleet, dev, hub):
        assert dev.fw == OLD
        await scenario(fleet, dev, hub)

    app_run(mosquitto, from_old, hub_class=OtaHub, heap=heap,
            ota={"ttl": confirm_s} if confirm_s else None)


def flash_json(dev, name):
    try:
        with open(os.path.join(dev.workdir, name)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


async def vote(fleet, dev, hub, pid, stars=5):
    await fleet.wait_for(lambda: dev.state == "IDLE", 15, "IDLE before " + pid)
    hub.send(DEVICE, "prompt", {"pid": pid, "case": "C-" + pid, "kind": "ji", "n": 1,
                                "item": None, "ttl": 60, "t": int(time.time())})
    await fleet.wait_for(lambda: dev.offers.get(pid) == "shown", 15, pid + " shown")
    await asyncio.sleep(0.3)
    await fleet.press(DEVICE, stars)
    saved = await fleet.wait_for(lambda: [s for s in dev.saved.values() if s.pid == pid], 15,
                                 pid + " saved")
    return saved[0].seq


def test_an_update_downloads_installs_boots_on_trial_and_confirms_keeping_the_journal(
        mosquitto, images):
    version, image = images["0.2.0"]

    async def scenario(fleet, dev, hub):
        # A vote the hub holds but does not ack: it stays in the journal through the update.
        hub.acking = False
        first = await vote(fleet, dev, hub, "P-before")
        await fleet.wait_for(lambda: hub.count(DEVICE, first) >= 1, 15, "vote at the hub")
        # Slow the download down (a few chunks, then a pause) so a citizen votes mid-way.
        hub.serve_below = 8 * CHUNK
        hub.offer(DEVICE, version, image)
        await fleet.wait_for(lambda: len(hub.got("get")) >= 8, 20, "first chunks asked for")
        during = await vote(fleet, dev, hub, "P-during", 4)
        await fleet.wait_for(lambda: hub.count(DEVICE, during) >= 1, 15,
                             "the vote made mid-download sent at once")
        assert not hub.got("installed")
        receipts = hub.count(DEVICE, first)
        hub.serve_below = None
        hub.client.publish("pj/%s/dn/fw" % DEVICE, b"\x00\x00\x00\x07junk", qos=1)  # not asked
        # The device asks again (5 s without a chunk) and the rest flows.
        await fleet.wait_for(lambda: hub.got("installed"), 60, "installed")
        await fleet.wait_for(lambda: dev.resets >= 1 and dev.fw == version, 30,
                             "rebooted into the new version")
        await fleet.wait_for(lambda: hub.got("ok"), 30, "confirmed")
        assert hub.got("ok")[-1]["ver"] == version
        assert flash_json(dev, "ota.json") == {"a": 1, "t": None, "n": 0}
        assert flash_json(dev, "dl.json") is None
        assert hub.births_fw[-1] == version
        # The offsets asked for: every chunk once in order, with repeats only of the one
        # that went unanswered.
        offs = [r["off"] for r in hub.got("get")]
        assert sorted(set(offs)) == list(range(0, len(image), CHUNK)), offs
        assert all(r["ver"] == version for r in hub.got("get"))
        # The journal came through: the new firmware sends the unacked votes again.
        await fleet.wait_for(lambda: hub.count(DEVICE, first) > receipts, 20,
                             "old vote resent by the new firmware")
        hub.acking = True
        hub.ack(DEVICE)
        stats = await fleet.stats(DEVICE)
        assert stats["next"] == during + 1, stats  # no sequence number reused
        after = await vote(fleet, dev, hub, "P-after", 3)
        assert after == during + 1
        await fleet.wait_for(lambda: hub.contiguous(DEVICE) == after, 15, "all acked")
        assert [hub.votes[(DEVICE, s)]["pid"] for s in (first, during, after)] == \
            ["P-before", "P-during", "P-after"]
        # The same offer again (the hub's retained one after a reconnect): already running it.
        n_ok = len(hub.got("ok"))
        hub.offer(DEVICE, version, image)
        await fleet.wait_for(lambda: len(hub.got("ok")) > n_ok, 15, "ok for the same version")
        assert dev.resets == 1

    run_device(mosquitto, scenario)


def test_an_image_whose_hash_differs_is_refused_and_not_installed(mosquitto, images):
    version, image = images["0.2.0"]

    async def scenario(fleet, dev, hub):
        hub.offer(DEVICE, version, image, sha="ab" * 32)
        await fleet.wait_for(lambda: hub.got("bad"), 30, "refused")
        assert hub.got("bad")[-1] == {"st": "bad", "ver": version, "why": "hash"}
        await asyncio.sleep(1.0)
        assert not hub.got("installed") and dev.resets == 0
        assert flash_json(dev, "ota.json") is None and flash_json(dev, "dl.json") is None
        # A retained offer delivered again (say, after a reconnect) is not fetched again.
        gets = len(hub.got("get"))
        hub.offer(DEVICE, version, image, sha="ab" * 32)
        await asyncio.sleep(1.5)
        assert len(hub.got("get")) == gets
        # An offer bigger than the slot is refused before a byte is fetched.
        hub.offer(DEVICE, "9.9.9", b"\x00" * (600 * 1024))
        await fleet.wait_for(lambda: any(r["why"] == "size" for r in hub.got("bad")), 15,
                             "too big")
        assert len(hub.got("get")) == gets

    run_device(mosquitto, scenario)


def test_a_power_cut_mid_download_resumes_where_the_flash_says(mosquitto, images):
    version, image = images["0.2.0"]

    async def scenario(fleet, dev, hub):
        hub.serve_below = 20 * CHUNK
        hub.offer(DEVICE, version, image)
        await fleet.wait_for(lambda: (flash_json(dev, "dl.json") or {}).get("got", 0) >= 16384,
                             30, "16 KB on flash")
        await fleet.power_cut(DEVICE)
        kept = flash_json(dev, "dl.json")
        assert kept["sha"] == hashlib.sha256(image).hexdigest() and kept["got"] >= 16384
        n_gets = len(hub.got("get"))
        hub.serve_below = None
        await fleet.spawn(DEVICE)
        await fleet.wait_for(lambda: len(hub.got("get")) > n_gets, 30, "asking again")
        assert hub.got("get")[n_gets]["off"] == kept["got"]  # resumed, not restarted
        await fleet.wait_for(lambda: hub.got("ok"), 60, "installed and confirmed")
        assert dev.fw == version and hub.got("ok")[-1]["ver"] == version
        assert min(r["off"] for r in hub.got("get")[n_gets:]) == kept["got"]

    run_device(mosquitto, scenario)


def test_an_image_that_crashes_at_boot_rolls_back_by_itself(mosquitto, images):
    version, image = images["0.3.0"]

    async def scenario(fleet, dev, hub):
        hub.offer(DEVICE, version, image)
        await fleet.wait_for(lambda: hub.got("installed"), 60, "installed")
        await fleet.wait_for(lambda: hub.got("rolledback"), 60, "rolled back")
        assert hub.got("rolledback")[-1] == {"st": "rolledback", "ver": version}
        # Into the trial and back out of it; the trial never said hello (it failed at import).
        assert dev.resets == 1
        assert dev.fw == OLD and dev.connected
        st = flash_json(dev, "ota.json")
        assert (st["a"], st["t"], st["rb"]) == (0, None, version)
        # Offered again, it is not fetched again: reported rolled back at once.
        gets = len(hub.got("get"))
        n = len(hub.got("rolledback"))
        hub.offer(DEVICE, version, image)
        await fleet.wait_for(lambda: len(hub.got("rolledback")) > n, 15, "rolledback again")
        assert len(hub.got("get")) == gets
        # Still votes on the old slot.
        seq = await vote(fleet, dev, hub, "P-rb")
        await fleet.wait_for(lambda: hub.contiguous(DEVICE) == seq, 15, "vote acked")

    run_device(mosquitto, scenario)


def test_an_image_that_never_reaches_the_hub_rolls_back_at_the_deadline(mosquitto, images):
    version, image = images["0.4.0"]

    async def scenario(fleet, dev, hub):
        hub.offer(DEVICE, version, image)
        await fleet.wait_for(lambda: hub.got("installed"), 60, "installed")
        await fleet.wait_for(lambda: dev.resets >= 1 and dev.fw == version, 30, "on trial")
        # Up and running, but never at the hub: no birth from it, no confirmation.
        births = len(hub.births_fw)
        await fleet.wait_for(lambda: hub.got("rolledback"), 60, "rolled back at the deadline")
        assert version not in hub.births_fw[births:]
        assert dev.resets == 2 and dev.fw == OLD
        assert flash_json(dev, "ota.json")["rb"] == version
        assert not hub.got("ok")

    run_device(mosquitto, scenario, confirm_s=6)


def hellos(dev):
    return [m for m in dev.recent if m.get("e") == "hello"]


def test_power_cuts_during_a_trial_roll_back_at_its_third_boot(mosquitto, images):
    version, image = images["0.5.0"]

    async def scenario(fleet, dev, hub):
        seen = len(hellos(dev))
        hub.offer(DEVICE, version, image)
        await fleet.wait_for(lambda: hub.got("installed"), 60, "installed")
        for n in (1, 2):
            # The trial boots (counted before it runs) and the power goes before it could
            # ever confirm; the deadline (120 s) is far away.
            await fleet.wait_for(lambda: len(hellos(dev)) > seen, 30, "trial boot %d" % n)
            assert hellos(dev)[-1]["fw"] == version
            seen = len(hellos(dev))
            st = flash_json(dev, "ota.json")
            assert (st["a"], st["t"], st["n"], st["tv"]) == (0, 1, n, version)
            await fleet.power_cut(DEVICE)
            await fleet.spawn(DEVICE)
        # The third boot: the selector gives up on the trial before it runs.
        await fleet.wait_for(lambda: hub.got("rolledback"), 30, "rolled back")
        assert hub.got("rolledback")[-1]["ver"] == version and dev.fw == OLD
        assert flash_json(dev, "ota.json") == {"a": 0, "t": None, "n": 0, "rb": version}

    run_device(mosquitto, scenario)


# ---- the ESP32-S3 board's slot hooks, against a stand-in for vfs.rom_ioctl ----------------
# What MicroPython documents: rom_ioctl(2, n) gives ROMFS segment n -- on the ESP32 port a
# partition object (a block device whose ioctl 4/5 give block count and size and 6 erases a
# block, and whose readblocks/writeblocks take a byte offset), elsewhere a memoryview of
# mapped flash written with rom_ioctl 3 (prepare), 4 (write), 5 (complete) -- or a negative
# errno. The stand-in behaves like NOR flash: erasing sets bytes to 0xFF, writing can only
# clear bits, so a write over unerased flash shows.
_ESP_SLOTS = r"""
import sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]

BLOCK = 4096


def program(mem, at, data):
    for i in range(len(data)):
        mem[at + i] &= data[i]


class Part:
    def __init__(self, blocks):
        self.mem = bytearray(b"\x00" * blocks * BLOCK)  # not erased
        self.blocks = blocks

    def ioctl(self, op, arg):
        if op == 4:
            return self.blocks
        if op == 5:
            return BLOCK
        if op == 6:
            self.mem[arg * BLOCK:(arg + 1) * BLOCK] = b"\xff" * BLOCK
            return 0
        return None

    def readblocks(self, block, buf, off=0):
        at = block * BLOCK + off
        buf[:] = self.mem[at:at + len(buf)]

    def writeblocks(self, block, buf, off=0):
        program(self.mem, block * BLOCK + off, buf)


mapped = bytearray(b"\x00" * 3 * BLOCK)
calls = []


class Vfs:
    segments = None

    def rom_ioctl(self, op, n=0, *args):
        calls.append(op)
        seg = self.segments[n] if n < len(self.segments) else None
        if seg is None:
            return -22
        if op == 2:
            return seg
        if op == 3:
            if args[0] > len(mapped):
                return -22
            mapped[:args[0]] = b"\xff" * args[0]
            return 4
        if op == 4:
            program(mapped, args[0], args[1])
            return 0
        if op == 5:
            return 0
        return -22


vfs = Vfs()
sys.modules["vfs"] = vfs
from board.esp32s3 import Board  # noqa: E402

board = Board({"board": "esp32s3-v1", "keys": []}, with_display=False)
image = bytes((i * 7 + 3) & 0xFF for i in range(9000))
out = {}
for kind in ("partition", "memoryview"):
    vfs.segments = [Part(2), Part(3)] if kind == "partition" else [None, memoryview(mapped)]
    board.slot_begin(1, len(image))
    for off in range(0, len(image), 1024):
        board.slot_write(1, off, image[off:off + 1024])
    back = bytearray(len(image))
    buf = bytearray(256)
    off = 0
    while off < len(image):
        k = board.slot_read(1, off, memoryview(buf)[:min(256, len(image) - off)])
        back[off:off + k] = buf[:k]
        off += k
    out[kind] = back == image
    out[kind + "_size"] = board.slot_size(1)
    try:
        board.slot_begin(1, 5 * BLOCK)
        out[kind + "_big"] = "accepted"
    except ValueError:
        out[kind + "_big"] = "ValueError"
    out[kind + "_tail"] = board.slot_read(1, board.slot_size(1) - 10, bytearray(256))
try:
    board.slot_begin(0, 10)
    out["missing"] = "accepted"
except OSError as exc:
    out["missing"] = exc.args[0]
out["complete_calls"] = calls.count(5)
import json  # noqa: E402
print(json.dumps(out))
"""


def test_esp32s3_slot_hooks_write_rom_segments_through_rom_ioctl(micropython, tmp_path):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "esp_slots.py"
    script.write_text(_ESP_SLOTS)
    proc = subprocess.run([micropython, "-X", "heapsize=1M", str(script),
                           os.path.join(root, "tests", "fake_esp32"),
                           os.path.join(root, "firmware")],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["partition"] is True and out["memoryview"] is True, out
    assert (out["partition_size"], out["memoryview_size"]) == (3 * 4096, 3 * 4096)
    assert out["partition_big"] == out["memoryview_big"] == "ValueError"
    assert out["partition_tail"] == out["memoryview_tail"] == 10  # clamped at the slot's end
    assert out["missing"] == 22  # no such segment: an OSError, never a crash
    assert out["complete_calls"] >= 9  # the memoryview kind: every write completed


def test_a_download_in_progress_leaves_the_heap_room_for_the_heaviest_vote(mosquitto, images):
    """The 64 KB budget with the updater loaded and a download half done: a catalogue on
    flash, a context with bitmaps, prompts with the largest item, bad ratings with reasons."""
    from test_app import (CATALOGUE, LIVE_MAX_BYTES, good_vote, pattern, publish_raw,
                          vote_with_reason,
                          wire_bitmap)

    version, image = images["0.2.0"]

    async def scenario(fleet, dev, hub):
        publish_raw(hub, "pj/%s/dn/cat" % DEVICE, CATALOGUE, retain=True)
        hub.send(DEVICE, "ctx", {"w": WINDOW, "sn": "10234", "name": wire_bitmap(pattern(1, 48, 16)),
                                 "win": wire_bitmap(pattern(2, 120, 16)),
                                 "t": int(time.time())}, retain=True)
        hub.serve_below = 24 * CHUNK
        hub.offer(DEVICE, version, image)
        await fleet.wait_for(lambda: len(hub.got("get")) >= 24, 30, "half the image")
        item = wire_bitmap(pattern(3, 256, 32))
        for i in range(2):
            await good_vote(fleet, dev, hub, "PH%d" % i, item, 0.5)
            await vote_with_reason(fleet, dev, hub)
        await fleet.wait_for(lambda: hub.contiguous(DEVICE) == 4, 15, "four votes at the hub")
        stats = await fleet.stats(DEVICE)
        print("heap mid-download: live max %d of %d" % (stats["live_max"], stats["size"]))
        assert stats["bad_downlinks"] == stats["rx_dropped"] == stats["rx_errors"] == 0, stats
        assert stats["live_max"] <= LIVE_MAX_BYTES, stats
        hub.serve_below = None  # and the download still completes
        await fleet.wait_for(lambda: hub.got("ok"), 60, "updated")

    run_device(mosquitto, scenario, heap=HEAP)
