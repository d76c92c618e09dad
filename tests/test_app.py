# The device app under the MicroPython unix port on the simulated board, against a real
# mosquitto and a stand-in hub (paho) that verifies MACs and acks -- or stays silent when
# a test needs to see what an unacked device does. Each test boots real firmware processes
# with a heap of 64 KB of bytes (-X heapsize=64K on this 64-bit host: DESIGN.md's device
# budget taken literally; docs/firmware.md, "Memory").
import asyncio
import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time

import paho.mqtt.client as paho
import pytest

from firmware.evaluator import codec
from firmware.evaluator.journal import Journal
from simulator.fleet import Fleet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "D0001"
WINDOW = "W001"
KEY = bytes(range(32))
HEAP = "64K"  # the whole device app, in bytes


class FakeHub:
    """The hub's MQTT side, minimal: verify, keep each (device, seq) once, ack contiguous."""

    def __init__(self, port, keys):
        self.keys = keys
        self.acking = True
        self.votes = {}  # (d, s) -> vote dict (first copy)
        self.receipts = []  # (d, s) of every vote received, repeats included
        self.rejected = []
        self.births = []
        self.evts = []
        self.wills = []
        self.lock = threading.Lock()
        self.arrivals = queue.Queue()
        # A persistent session, like the real hub's: uplinks wait at the broker while the
        # hub is reconnecting.
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="fake-hub",
                                  clean_session=False)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_message = self._on_message
        # Subscribe on every connect: paho reconnects by itself after a broker restart.
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("pj/+/up/#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()

    def contiguous(self, device_id):
        with self.lock:
            n = 0
            while (device_id, n + 1) in self.votes:
                n += 1
            return n

    def ack(self, device_id):
        self.client.publish("pj/%s/dn/ack" % device_id,
                            codec.encode_ack(self.contiguous(device_id)), qos=1)

    def send(self, device_id, kind, obj, retain=False):
        info = self.client.publish("pj/%s/dn/%s" % (device_id, kind), json.dumps(obj).encode(),
                                   qos=1, retain=retain)
        info.wait_for_publish(5)

    def count(self, device_id, seq):
        with self.lock:
            return self.receipts.count((device_id, seq))

    def _on_message(self, client, userdata, msg):
        parts = msg.topic.split("/")
        device_id, kind = parts[1], parts[-1]
        obj = json.loads(msg.payload)
        if kind == "vote":
            vote = codec.validate_vote(obj)
            if vote["d"] != device_id or not codec.verify_vote(self.keys[device_id], vote):
                self.rejected.append(vote["s"])
                return
            with self.lock:
                self.receipts.append((device_id, vote["s"]))
                self.votes.setdefault((device_id, vote["s"]), vote)
            if self.acking:
                self.ack(device_id)
        elif kind == "birth":
            self.births.append(obj)
            if self.acking:
                self.ack(device_id)
        elif kind == "evt":
            self.evts.append(obj)
        elif kind == "will":
            self.wills.append(obj)


def device_config(port):
    return {"device_id": DEVICE, "key": KEY.hex(), "hub_host": "127.0.0.1", "hub_port": port,
            "mqtt_user": DEVICE, "mqtt_password": "unused-on-an-anonymous-broker",
            "window": WINDOW}


def run(mosquitto, scenario, flash=None, hub_class=None, heap=HEAP, ota=None):
    """Boot one device against mosquitto + FakeHub (or `hub_class`) and run
    `scenario(fleet, dev, hub)`; `flash` and `ota` go to Fleet.add."""
    hub = (hub_class or FakeHub)(mosquitto.port, {DEVICE: KEY})
    tmp = tempfile.mkdtemp(prefix="pj-app-")

    async def main():
        fleet = Fleet(tmp, heap=heap)
        await fleet.start()
        fleet.add(DEVICE, device_config(mosquitto.port), flash=flash, ota=ota)
        try:
            await fleet.spawn(DEVICE)
            dev = fleet.devices[DEVICE]
            await fleet.wait_for(lambda: dev.connected, 30, "device connected")
            hub.send(DEVICE, "ctx", {"w": WINDOW, "sn": "10234", "name": None, "win": None,
                                     "t": int(time.time())}, retain=True)
            await fleet.wait_for(lambda: dev.state == "IDLE", 15, "IDLE")
            await scenario(fleet, dev, hub)
            assert not fleet.crashed(), fleet.log_tail(DEVICE)
        except BaseException:
            print(fleet.log_tail(DEVICE, 40))
            raise
        finally:
            await fleet.close()

    try:
        asyncio.run(main())
    finally:
        hub.close()
        shutil.rmtree(tmp, ignore_errors=True)


_pids = iter(range(1, 1000000))


async def prompt(fleet, dev, hub, ttl=60):
    pid = "P%d" % next(_pids)
    hub.send(DEVICE, "prompt", {"pid": pid, "case": "C-" + pid, "kind": "ji", "n": 1,
                                "item": None, "ttl": ttl, "t": int(time.time())})
    await fleet.wait_for(lambda: dev.offers.get(pid), 15, "offer " + pid)
    assert dev.offers[pid] == "shown"
    return pid


async def vote(fleet, dev, hub, stars=5):
    """A citizen rates: prompt, press, wait for the durable record and the rest state."""
    await fleet.wait_for(lambda: dev.state == "IDLE", 15, "IDLE")
    pid = await prompt(fleet, dev, hub)
    await fleet.press(DEVICE, stars)
    saved = await fleet.wait_for(lambda: [s for s in dev.saved.values() if s.pid == pid], 15,
                                 "saved " + pid)
    return saved[0]


async def unrated(fleet, dev, hub):
    """A citizen walks away: the prompt times out into an unrated record."""
    await fleet.wait_for(lambda: dev.state == "IDLE", 15, "IDLE")
    pid = await prompt(fleet, dev, hub, ttl=1)
    saved = await fleet.wait_for(lambda: [s for s in dev.saved.values() if s.pid == pid], 15,
                                 "unrated " + pid)
    return saved[0]


def journal_records(dev):
    """Read the device's flash as it is now (a copy, so recovery never touches the original)."""
    copy = tempfile.mkdtemp(prefix="pj-flash-")
    try:
        shutil.copytree(dev.journal_dir, os.path.join(copy, "j"))
        journal = Journal(os.path.join(copy, "j"))
        return {seq: payload for seq, _t, payload in journal.unacked()}
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def test_a_vote_is_on_flash_before_thanks_and_the_hub_gets_it_signed(mosquitto):
    async def scenario(fleet, dev, hub):
        hub.acking = False  # keep the record in the journal so the copy can show it
        pid = await prompt(fleet, dev, hub)
        await fleet.press(DEVICE, 4)
        await fleet.wait_for(lambda: dev.state == "THANKS", 15, "THANKS")
        # The moment the screen says thanks, the record is already in the journal files.
        records = journal_records(dev)
        assert list(records) == [1]
        stored = codec.decode_vote(records[1])
        assert codec.verify_vote(KEY, stored)
        assert (stored["pid"], stored["stars"], stored["k"], stored["w"], stored["sn"]) == \
            (pid, 4, "v", WINDOW, "10234")
        # ...and the device said so in that order: saved, then the thanks screen.
        kinds = [(e.get("e"), e.get("st")) for e in dev.recent]
        assert kinds.index(("saved", None)) < kinds.index(("state", "THANKS"))
        await fleet.wait_for(lambda: (DEVICE, 1) in hub.votes, 15, "vote at hub")
        assert hub.votes[(DEVICE, 1)] == stored
        assert hub.rejected == []
        assert {"pid": pid, "st": "shown"} in hub.evts
        stats = await fleet.stats(DEVICE)
        assert stats["jd"] == 1 and stats["saved"] == 1
        assert stats["live_max"] < stats["size"]

    run(mosquitto, scenario)


def test_a_failed_flash_write_shows_the_qr_fallback_never_thanks(mosquitto):
    async def scenario(fleet, dev, hub):
        await fleet.request(DEVICE, {"c": "flash", "fail": True})
        await prompt(fleet, dev, hub)
        await fleet.press(DEVICE, 5)
        await fleet.wait_for(lambda: dev.state == "FULL", 15, "FULL")
        await asyncio.sleep(1.0)
        assert dev.saved == {}
        assert not any(e.get("st") == "THANKS" for e in dev.recent)
        assert hub.receipts == []
        stats = await fleet.stats(DEVICE)
        assert stats["flash_errors"] == 1 and stats["saved"] == 0
        # Flash works again after a power cycle. Whether the failed write left a complete
        # record is up to the flash (recovery keeps any record whose CRC checks); either
        # way the hub ends with one contiguous sequence and the new vote continues it.
        await fleet.request(DEVICE, {"c": "flash", "fail": False})
        await fleet.restart(DEVICE)
        await fleet.wait_for(lambda: dev.connected and dev.state == "IDLE", 30, "back")
        saved = await vote(fleet, dev, hub, 3)
        assert saved.seq in (1, 2)
        await fleet.wait_for(lambda: hub.contiguous(DEVICE) == saved.seq, 15, "votes at hub")
        assert hub.votes[(DEVICE, saved.seq)]["stars"] == 3
        assert hub.rejected == []

    run(mosquitto, scenario)


def test_unacked_records_are_resent_and_the_ack_trims_the_journal(mosquitto):
    async def scenario(fleet, dev, hub):
        hub.acking = False
        first = [await unrated(fleet, dev, hub) for _ in range(7)]
        assert [s.seq for s in first] == list(range(1, 8))
        assert all(s.kind == "u" for s in first)
        await fleet.wait_for(lambda: hub.contiguous(DEVICE) == 7, 15, "all at hub")
        segments = sorted(os.listdir(dev.journal_dir))
        assert len(segments) >= 2  # a few records per 1 KB segment
        # A PUBACK from the broker is not an ack: with no ack for 10 s the device sends
        # its journal again from the oldest unacked record.
        await fleet.wait_for(lambda: hub.count(DEVICE, 1) >= 2, 25, "resend of seq 1")
        assert (await fleet.stats(DEVICE))["jd"] == 7
        hub.acking = True
        hub.ack(DEVICE)
        deadline = time.monotonic() + 15
        while (await fleet.stats(DEVICE))["jd"] != 0:
            assert time.monotonic() < deadline, "journal never trimmed"
            await asyncio.sleep(0.2)
        # Whole acked segments are gone; only the active one stays (acks are not written
        # to flash, so after a reboot its records would go again and be acked again).
        assert os.listdir(dev.journal_dir) == [segments[-1]]
        assert min(journal_records(dev)) == int(segments[-1][1:-4])
        assert hub.rejected == []

    run(mosquitto, scenario, flash={"segment_bytes": 1024})


def test_a_full_journal_refuses_prompts_until_acks_free_room(mosquitto):
    async def scenario(fleet, dev, hub):
        hub.acking = False
        made = []
        # Two 1 KB segments: a handful of records, then no room for another vote.
        while dev.state != "FULL":
            assert len(made) < 12, "the journal never filled"
            made.append(await unrated(fleet, dev, hub))
            await fleet.wait_for(lambda: dev.state in ("IDLE", "FULL"), 15, "rest")
        assert [s.seq for s in made] == list(range(1, len(made) + 1))
        pid = "PFULL"
        hub.send(DEVICE, "prompt", {"pid": pid, "case": "C", "kind": "ji", "n": 1,
                                    "item": None, "ttl": 60, "t": int(time.time())})
        await fleet.wait_for(lambda: dev.offers.get(pid), 15, "offer while full")
        assert dev.offers[pid] == "full"  # the hub learns the device shows the QR code
        await fleet.wait_for(lambda: {"pid": pid, "st": "full"} in hub.evts, 15, "evt full")
        await fleet.press(DEVICE, 5)  # a press on the QR screen makes nothing
        await asyncio.sleep(0.5)
        assert len(dev.saved) == len(made)
        # Acks free whole segments: the device takes ratings again, nothing was lost.
        await fleet.wait_for(lambda: hub.contiguous(DEVICE) == len(made), 15, "all at hub")
        hub.acking = True
        hub.ack(DEVICE)
        await fleet.wait_for(lambda: dev.state == "IDLE", 15, "IDLE after acks")
        again = await vote(fleet, dev, hub, 5)
        assert again.seq == len(made) + 1
        await fleet.wait_for(lambda: hub.contiguous(DEVICE) == again.seq, 15, "new vote at hub")
        assert (await fleet.stats(DEVICE))["misuse"] >= 1

    run(mosquitto, scenario, flash={"journal_segments": 2, "segment_bytes": 1024})


def test_a_power_cut_loses_nothing_and_never_reuses_a_sequence(mosquitto):
    async def scenario(fleet, dev, hub):
        hub.acking = False
        made = [await vote(fleet, dev, hub, 5), await unrated(fleet, dev, hub)]
        # The third citizen rates while the broker is down: the record is durable but has
        # nowhere to go -- and then the power goes.
        await fleet.wait_for(lambda: dev.state == "IDLE", 15, "IDLE")
        pid = await prompt(fleet, dev, hub)
        mosquitto.stop()
        await fleet.press(DEVICE, 2)
        await fleet.wait_for(lambda: dev.state == "REASONS", 15, "REASONS")
        for key in (3, 1):  # 选择 the first reason, 提交
            await asyncio.sleep(0.4)
            await fleet.press(DEVICE, key)
        made += await fleet.wait_for(lambda: [s for s in dev.saved.values() if s.pid == pid],
                                     15, "saved offline")
        await fleet.kill(DEVICE)
        assert [s.seq for s in made] == [1, 2, 3]
        assert hub.count(DEVICE, 3) == 0
        mosquitto.start()
        hub.acking = True
        await fleet.spawn(DEVICE)
        await fleet.wait_for(lambda: dev.connected and len(hub.births) == 2, 30, "reconnected")
        await fleet.wait_for(lambda: hub.contiguous(DEVICE) == 3, 30, "all three at hub")
        for saved in made:
            assert hub.votes[(DEVICE, saved.seq)] == json.loads(saved.payload)
        assert hub.votes[(DEVICE, 3)]["stars"] == 2 and len(hub.votes[(DEVICE, 3)]["rs"]) == 1
        birth = hub.births[-1]
        assert (birth["rst"], birth["lo"], birth["next"], birth["jd"]) == ("power", 1, 4, 3)
        # Durable records are never renumbered: the next one continues the sequence.
        await fleet.wait_for(lambda: dev.state == "IDLE", 15, "IDLE after boot")
        after = await vote(fleet, dev, hub, 4)
        assert after.seq == 4
        await fleet.wait_for(lambda: hub.contiguous(DEVICE) == 4, 15, "fourth at hub")
        assert hub.rejected == []

    run(mosquitto, scenario)


# ---- the catalogue on flash, and the heap -------------------------------------------------
def wire_bitmap(rows):
    """A wire bitmap (docs/protocol.md) of rows of 0/1, packed MSB first."""
    import base64

    w = len(rows[0])
    raw = bytearray()
    for row in rows:
        for x in range(0, w, 8):
            byte = 0
            for bit in range(8):
                if x + bit < w and row[x + bit]:
                    byte |= 0x80 >> bit
            raw.append(byte)
    return {"w": w, "h": len(rows), "b": base64.b64encode(bytes(raw)).decode()}


def pattern(seed, w, h):
    # Rows of 0/1 that differ from reason to reason, so each is recognisable on screen.
    return [[1 if (x * 7 + y * 3 + seed * 5) % (3 + seed % 4) == 0 else 0 for x in range(w)]
            for y in range(h)]


CAT_CV = "test-2026.1"
REASONS = [("R%02d" % i, "staff" if i < 6 else "item", pattern(i, 128, 16)) for i in range(12)]
# Twelve 128 x 16 bitmaps: over twice the app's 2 KB receive buffer, so the MQTT client
# spools it to flash as it arrives (docs/mqtt.md, "Sizes").
CATALOGUE = json.dumps({"cv": CAT_CV, "rs": [{"c": c, "a": a, "bm": wire_bitmap(rows)}
                                              for c, a, rows in REASONS]})


def publish_raw(hub, topic, payload, retain=False):
    hub.client.publish(topic, payload.encode(), qos=1, retain=retain).wait_for_publish(5)


async def screen(fleet):
    from simulator.framebuffer import pixels

    w, h, raw = await fleet.framebuffer(DEVICE)
    return pixels(raw, w, h)


def region(px, x, y, w, h):
    return [row[x:x + w] for row in px[y:y + h]]


def test_a_catalogue_bigger_than_the_receive_buffer_reaches_the_screen_from_flash(mosquitto):
    assert len(CATALOGUE) > 2 * 2048

    async def scenario(fleet, dev, hub):
        publish_raw(hub, "pj/%s/dn/cat" % DEVICE, CATALOGUE, retain=True)
        cat_json = os.path.join(fleet.root_dir, DEVICE, "cat.json")
        await fleet.wait_for(lambda: os.path.exists(cat_json), 15, "cat.json")
        with open(cat_json) as f:
            assert json.load(f) == json.loads(CATALOGUE)  # spooled as it came
        pid = await prompt(fleet, dev, hub)
        await fleet.press(DEVICE, 2)
        await fleet.wait_for(lambda: dev.state == "REASONS", 15, "REASONS")
        await asyncio.sleep(0.5)
        px = await screen(fleet)
        # The first page: the cursor's reason inverted, the next one plain, each bitmap as
        # the hub sent it (loaded from cat.bin for this page only).
        assert region(px, 16, 0, 128, 16) == [[1 - p for p in row] for row in REASONS[0][2]]
        assert region(px, 16, 16, 128, 16) == REASONS[1][2]
        for key in (4, 3, 1):  # 下, 选择, 提交
            await asyncio.sleep(0.4)
            await fleet.press(DEVICE, key)
        await fleet.wait_for(lambda: [s for s in dev.saved.values() if s.pid == pid], 15, "saved")
        await fleet.wait_for(lambda: (DEVICE, 1) in hub.votes, 15, "vote at hub")
        vote = hub.votes[(DEVICE, 1)]
        assert (vote["stars"], vote["rs"], vote["cv"]) == (2, [REASONS[1][0]], CAT_CV)
        # A power cut and the same retained catalogue again: read, but nothing rewritten.
        files = [os.path.join(fleet.root_dir, DEVICE, n) for n in ("cat.json", "cat.bin")]
        written = [os.stat(f).st_mtime_ns for f in files]
        births = len(hub.births)
        await fleet.restart(DEVICE)
        await fleet.wait_for(lambda: dev.connected and len(hub.births) > births, 30, "back")
        await fleet.wait_for(lambda: dev.state == "IDLE", 15, "IDLE")
        await asyncio.sleep(1.0)
        assert [os.stat(f).st_mtime_ns for f in files] == written
        # A catalogue the rating refuses (a code twice) leaves the one in use.
        bad = json.loads(CATALOGUE)
        bad["cv"] = "bad-1"
        bad["rs"][1]["c"] = bad["rs"][0]["c"]
        publish_raw(hub, "pj/%s/dn/cat" % DEVICE, json.dumps(bad))
        await fleet.wait_for(lambda: os.path.exists(cat_json + ".new") is False, 15, "settled")
        await asyncio.sleep(1.0)
        saved = await vote_with_reason(fleet, dev, hub)
        await fleet.wait_for(lambda: (DEVICE, saved.seq) in hub.votes, 15, "second vote")
        vote = hub.votes[(DEVICE, saved.seq)]
        assert (vote["rs"], vote["cv"]) == ([REASONS[0][0]], CAT_CV)
        with open(cat_json) as f:
            assert json.load(f)["cv"] == CAT_CV

    run(mosquitto, scenario)


async def good_vote(fleet, dev, hub, pid, item, think_s):
    """A prompt with `item` as its bitmap, shown, then 5 stars after `think_s`; waits until
    the vote is saved."""
    await fleet.wait_for(lambda: dev.state == "IDLE", 15, "IDLE")
    hub.send(DEVICE, "prompt", {"pid": pid, "case": "C-" + pid, "kind": "ji", "n": 1,
                                "item": item, "ttl": 60, "t": int(time.time())})
    try:
        await fleet.wait_for(lambda: dev.offers.get(pid), 15, pid)
    except Exception:
        print("no offer:", await fleet.stats(DEVICE))
        raise
    assert dev.offers[pid] == "shown", (dev.offers, await fleet.stats(DEVICE))
    await asyncio.sleep(think_s)
    await fleet.press(DEVICE, 5)
    await fleet.wait_for(lambda: [s for s in dev.saved.values() if s.pid == pid], 15,
                         "saved " + pid)


async def vote_with_reason(fleet, dev, hub, ttl=60):
    """A bad rating: 2 stars, the first reason chosen, submitted; returns the saved record."""
    await fleet.wait_for(lambda: dev.state == "IDLE", 15, "IDLE")
    pid = await prompt(fleet, dev, hub, ttl)
    await fleet.press(DEVICE, 2)
    await fleet.wait_for(lambda: dev.state == "REASONS", 15, "REASONS")
    for key in (3, 1):  # 选择, 提交
        await asyncio.sleep(0.4)
        await fleet.press(DEVICE, key)
    saved = await fleet.wait_for(lambda: [s for s in dev.saved.values() if s.pid == pid], 15,
                                 "saved " + pid)
    return saved[0]


# The device heap the app must stay within, on this 64-bit host at -X heapsize=64K
# (64640 bytes for objects): the highest live heap sampled (after a collection) through a
# catalogue, a signed-in context and prompts with bitmaps, good and bad votes; and the free
# heap a device reports in its birth with all of that in place (docs/firmware.md, "Memory").
LIVE_MAX_BYTES = 58 * 1024
BIRTH_FREE_MIN_BYTES = 9 * 1024  # room to spare at birth; GC timing moves it by tens of bytes


def test_the_app_stays_within_its_64k_heap_through_downlinks_and_votes(mosquitto):
    name = wire_bitmap(pattern(1, 48, 16))
    win = wire_bitmap(pattern(2, 120, 16))
    item = wire_bitmap(pattern(3, 256, 32))  # the largest item the hub renders: 2 lines

    async def scenario(fleet, dev, hub):
        publish_raw(hub, "pj/%s/dn/cat" % DEVICE, CATALOGUE, retain=True)
        hub.send(DEVICE, "ctx", {"w": WINDOW, "sn": "10234", "name": name, "win": win,
                                 "t": int(time.time())}, retain=True)
        for i in range(3):
            await good_vote(fleet, dev, hub, "PM%d" % i, item, 0.6)
            await vote_with_reason(fleet, dev, hub)
        await fleet.wait_for(lambda: hub.contiguous(DEVICE) == 6, 15, "six votes at the hub")
        stats = await fleet.stats(DEVICE)
        assert 60 * 1024 < stats["size"] <= 64 * 1024, stats  # -X heapsize=64K
        assert stats["bad_downlinks"] == stats["rx_dropped"] == stats["rx_errors"] == 0, stats
        assert stats["draw_errors"] == 0 and stats["saved"] == 6, stats
        assert stats["live_max"] <= LIVE_MAX_BYTES, stats
        births = len(hub.births)
        await fleet.restart(DEVICE)  # a birth with the catalogue and the context in place
        await fleet.wait_for(lambda: len(hub.births) > births, 30, "birth")
        await fleet.wait_for(lambda: dev.state == "IDLE", 15, "IDLE")
        assert hub.births[-1]["heap"] >= BIRTH_FREE_MIN_BYTES, hub.births[-1]
        print("device heap at 64K: live max %d of %d bytes, %d free at birth"
              % (stats["live_max"], stats["size"], hub.births[-1]["heap"]))

    run(mosquitto, scenario)


@pytest.fixture
def app_alone(micropython, tmp_path):
    """tests/mp_device/scan_alloc.py's observations: the app built on the simulated board
    (no network), its key scans measured, its interned names counted."""
    from simulator import build as fwbuild

    build = fwbuild.build()
    proc = subprocess.run([micropython, "-X", "heapsize=512K",
                           os.path.join(ROOT, "tests", "mp_device", "scan_alloc.py"),
                           build.out_dir, str(tmp_path)],
                          env=dict(os.environ, MICROPYPATH=".frozen"), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    pools = [line for line in lines if line.startswith("qstr pool:")][-1]
    out["qstr"] = {k: int(v) for k, v in re.findall(r"(n_pool|n_qstr)=(\d+)", pools)}
    return out


def test_a_key_scan_allocates_nothing(app_alone):
    """The app scans the keys every 20 ms for ever: no garbage there, so the collector
    stays idle and the 64 KB heap does not fragment."""
    out = app_alone
    assert (out["idle_state"], out["prompt_state"]) == ("IDLE", "PROMPT")
    assert out["idle"] == 0  # 600 scans: keys, timeouts, journal room, screen unchanged
    assert out["prompt"] == 0  # between the countdown's frames


# The port interns every name the loaded modules use in pools it allocates on the heap,
# each twice the size of the one before; the fifth holds names up to about 615. One name
# more takes a sixth pool of 7 KB at once (docs/firmware.md, "Memory"), so the app keeps
# well under it: the running device adds a few names (its boot script) to this count.
MAX_INTERNED = 580


def test_the_app_interns_few_enough_names_to_stay_in_five_pools(app_alone):
    qstr = app_alone["qstr"]
    assert qstr["n_pool"] <= 5 and qstr["n_qstr"] <= MAX_INTERNED, qstr


# The real-board entry point: firmware/start.py (what the boot selector imports from the
# app slot) on the ESP32-S3 board layer, with the fake
# machine/network modules of tests/fake_esp32 and the device's files at "/" (a folder
# remounted as the root, as a board's flash is).
_ESP_BOOT = """
import sys, vfs
vfs.umount("/")
vfs.mount(vfs.VfsPosix(sys.argv[1]), "/")
vfs.mount(vfs.VfsPosix(sys.argv[2]), "/fw")
sys.path[:] = ["/fw", ".frozen", "/"]
import start
"""


def test_start_boots_the_esp32s3_board_and_runs_the_app(mosquitto, micropython, tmp_path):
    from simulator import build as fwbuild

    build = fwbuild.build()
    unit = tmp_path / "unit"
    unit.mkdir()
    for name in ("machine.py", "network.py"):
        shutil.copy(os.path.join(ROOT, "tests", "fake_esp32", name), unit / name)
    shutil.copy(os.path.join(ROOT, "hardware", "boards", "esp32s3-evaluator.json"),
                unit / "board.json")
    config = device_config(mosquitto.port)
    config["wifi"] = {"ssid": "hall", "password": "hall-wifi-pass"}
    (unit / "config.json").write_text(json.dumps(config))
    hub = FakeHub(mosquitto.port, {DEVICE: KEY})
    # A big heap: the fake SPI bus keeps every byte the panel was sent.
    proc = subprocess.Popen([micropython, "-X", "heapsize=4M", "-c", _ESP_BOOT, str(unit),
                             build.out_dir], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not hub.births and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert hub.births, proc.stdout.read1().decode() if proc.poll() is not None else "no birth"
        birth = hub.births[0]
        assert (birth["d"], birth["board"], birth["rst"], birth["rssi"]) == \
            (DEVICE, "esp32s3-v1", "power", -61)
        assert (birth["lo"], birth["next"], birth["jd"]) == (1, 1, 0)
        hub.send(DEVICE, "ctx", {"w": WINDOW, "sn": "10234", "name": None, "win": None,
                                 "t": int(time.time())}, retain=True)
        hub.send(DEVICE, "prompt", {"pid": "PESP", "case": "C1", "kind": "ji", "n": 1,
                                    "item": None, "ttl": 60, "t": int(time.time())})
        deadline = time.monotonic() + 15
        while {"pid": "PESP", "st": "shown"} not in hub.evts and time.monotonic() < deadline:
            time.sleep(0.1)
        assert {"pid": "PESP", "st": "shown"} in hub.evts
        assert (unit / "journal").is_dir()  # the journal lives on the unit's flash
    finally:
        proc.kill()
        proc.wait(10)
        hub.close()


async def prompt_when_online(api, window, case_no, wait_s=30):
    """The window system's prompt, once the hub has seen the device come back: after a
    power cut the hub holds the device's last will until its birth arrives, and refuses
    prompts for an offline device (the citizen gets the receipt's QR code instead)."""
    from simulator.citizens import CitizenError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await api.prompt(window, case_no, ("dept", "task", "事项"))
        except CitizenError as exc:
            if "offline" not in str(exc) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


def test_against_the_real_hub_a_power_cut_mid_stream_loses_nothing(tmp_path):
    """Two devices, the real hub (supervising mosquitto) and the reference province:
    power cuts right after votes become durable, and every vote arrives exactly once."""
    import aiohttp

    from simulator.citizens import HubAPI
    from simulator.run import Hall, Options, ProvinceView

    hall = Hall(Options(devices=2, votes=0), str(tmp_path), lambda line: None)

    async def main():
        hall.prepare()
        hall.start_services()
        fleet = Fleet(str(tmp_path / "devices"), heap=HEAP)
        try:
            async with aiohttp.ClientSession() as session:
                await hall.wait_ready(session)
                api = HubAPI(session, hall.http_url)
                await fleet.start()
                for device_id in sorted(hall.provisioned):
                    await api.sign_in(hall.windows[device_id], "10234", "王芳")
                    fleet.add(device_id, hall.device_config(device_id))
                    await fleet.spawn(device_id)
                made = {}
                for round_no in range(3):
                    for device_id, dev in fleet.devices.items():
                        await fleet.wait_for(lambda: dev.connected and dev.state == "IDLE", 60,
                                             device_id + " idle")
                        # One open prompt per case number at the hub: each device's own.
                        pid = await prompt_when_online(api, hall.windows[device_id],
                                                       "CASE-%s-%d" % (device_id, round_no))
                        await fleet.wait_for(lambda: dev.offers.get(pid) == "shown", 15, pid)
                        await fleet.press(device_id, 5 - round_no)
                        saved = await fleet.wait_for(
                            lambda: [s for s in dev.saved.values() if s.pid == pid], 15, pid)
                        made["%s:%d" % (device_id, saved[0].seq)] = saved[0]
                        # The power goes the instant the vote is durable: it may or may not
                        # have left the device yet.
                        await fleet.restart(device_id)
                province = ProvinceView(session, hall.province_url)
                deadline = time.monotonic() + 60
                while not set(made) <= set(province.records) and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    await province.poll()
                await asyncio.sleep(1.0)
                await province.poll()
                stats = await province.stats()
            assert set(province.records) == set(made)
            for vote_id, saved in made.items():
                assert province.records[vote_id]["satisfaction"] == str(saved.stars)
            assert stats["duplicates"] == 0 and province.repeats == 0
            assert all(d.boots == 4 for d in fleet.devices.values())
            assert not fleet.crashed()
        finally:
            await fleet.close()
            hall.stop()

    asyncio.run(main())
