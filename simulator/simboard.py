# The simulated board: what firmware/board/esp32s3.py is on real hardware, for the
# MicroPython unix port. The firmware above it cannot tell the difference.
#
# - keys: one "pin" per star level (a callable returning the raw level, active low like
#   the reference board); presses arrive over the control channel and are played as real
#   level changes, so the firmware's debounce and stuck-key logic run unchanged;
# - display: a MONO_HLSB framebuffer; the simulator asks for its bytes over the channel;
# - flash: files in the device's own directory (its journal dir, and `files`: the
#   catalogue the app keeps on flash); a process kill is a power cut. `fs_sync` flushes to
#   the host kernel, which survives the kill of this process exactly as a synced flash
#   page survives a power cut;
# - app slots (over-the-air updates, docs/firmware.md): files slot0.img / slot1.img in the
#   device's directory, each a ROMFS image; the launcher (simulator/fleet.py) maps them and
#   firmware/bootsel.py mounts the one that boots. reset() ends this MicroPython run with
#   the status the launcher takes as "boot again": the same process re-executes itself and
#   says hello with rst "soft";
# - clock: the host's.
#
# Control channel: one TCP connection to the simulator (127.0.0.1) carrying JSON lines.
# Device -> simulator: {"e": "hello", "d": id, ...} first, then events from the app
# ({"e": "saved", "seq": N, "k": "v", ...}, {"e": "state", "st": ...}, ...) and answers.
# Simulator -> device: {"c": "press", "stars": N[, "ms": held, "gap": ms since the last]} |
# {"c": "hold", "stars": N, "ms": M} |
# {"c": "fb"} | {"c": "stats"} | {"c": "flash", "fail": bool}. See docs/simulator.md.
import gc
import json
import os
import time

import asyncio
import micropython

from display import Display
from evaluator import VERSION
from mqtt import open_link

from micropython import const  # MicroPython only: no fallback to load

_PRESS_MS = const(90)  # a citizen's finger: long enough for the 30 ms debounce
_GAP_MS = const(70)  # released between queued presses
_PRESS_SLOTS = const(16)  # queued presses; overflow drops the newest, counted
_LINE_SLOTS = const(64)  # event lines waiting for the socket; overflow drops the oldest
_LINE_BYTES = const(6144)  # ...and at most this many bytes of them (the heap is 64 KB)
_MAX_LINE = const(256)  # longest command line accepted (a command is some 60 bytes)
_HEAP_EVERY_MS = const(2000)  # the live heap is sampled this often
_CHUNK = const(64)  # control-channel bytes read per poll
_RESET = const(75)  # exit status: the launcher boots the device again (bootsel.py's too)
_SLOT_BYTES = const(524288)  # an app slot's size


class SimPin:
    """A key's raw level: 1 released (pull-up), 0 pressed; calling it reads it, as calling
    a machine.Pin does."""

    def __init__(self):
        self.level = 1

    def __call__(self):
        return self.level


class SimBoard:
    def __init__(self, spec, device_id, ctl_port=0, path=".", reset_cause="power"):
        # path: the device's own directory, its flash
        # The spec (board.json) is read here and not kept: the caller drops it after boot.
        self.name = spec.get("board", "sim-v1")
        self.device_id = device_id
        self.ctl_port = ctl_port
        keys = spec.get("keys") or [{"stars": s, "active": 0} for s in (5, 4, 3, 2, 1)]
        self.key_active = keys[0].get("active", 0)
        self.keys_pins = {}
        for k in keys:
            self.keys_pins[k["stars"]] = SimPin()
        disp = spec.get("display") or {}
        # The firmware's own panel-less Display; its sink is where a bus error is injected.
        self.display = Display(disp.get("width", 256), disp.get("height", 64), sink=self._panel)
        self.fail_display = False
        flash = spec.get("flash") or {}
        jdir = flash.get("journal_dir", "journal")
        self.journal_dir = jdir if jdir.startswith("/") else path.rstrip("/") + "/" + jdir
        self.files = path  # the device's own files (the catalogue), beside the journal
        self.journal_segments = flash.get("journal_segments", 16)
        self.segment_bytes = flash.get("segment_bytes", 4096)
        self.rst = reset_cause  # (named like the hello's key: one interned name fewer)
        self.app = None
        self.fail_sync = False
        self._presses = []
        now = time.ticks_ms()
        self._last_press = now  # when the last press began
        self._up_at = None  # while a key is down: when to release it
        self._free_at = now  # released keys rest until then before the next press
        self._sampled = now
        self._lines = []
        self._queued = 0  # bytes in _lines
        self._writer = None
        self.presses_dropped = 0
        self.lines_dropped = 0
        self.live_max = 0

    # ---- the board interface the app uses ---------------------------------------------
    def reset_cause(self):
        return self.rst

    def rssi(self):
        return -55

    def free_heap(self):
        return gc.mem_free()

    def fs_sync(self, f):
        # A flash write that fails (injected) must surface as OSError to the journal.
        if self.fail_sync:
            raise OSError(5)
        f.flush()

    # ---- app slots and reset (firmware/ota.py) --------------------------------------------
    # Slot n is the file slot<n>.img in the device's directory (self.files); a write that
    # fails is injected with the "flash" command, as for the journal.
    def slot_begin(self, n, size):
        # A new file, not the old one truncated: the launcher may have the old one mapped
        # (a truncated mapping faults), and a fresh unit's slot0.img may be a link to the
        # build's image, which must never change under other devices.
        if size > _SLOT_BYTES:
            raise ValueError("size")
        if self.fail_sync:
            raise OSError(5)
        path = self.files + "/slot%d.img" % n
        try:
            os.remove(path)
        except OSError:
            pass
        open(path, "wb").close()

    def slot_write(self, n, off, buf):
        # Written and flushed to the host kernel: that survives the kill of this process,
        # as a synced flash write survives a power cut.
        if self.fail_sync:
            raise OSError(5)
        with open(self.files + "/slot%d.img" % n, "r+b") as f:
            f.seek(off)
            f.write(buf)
            f.flush()

    def slot_read(self, n, off, buf):
        with open(self.files + "/slot%d.img" % n, "rb") as f:
            f.seek(off)
            return f.readinto(buf) or 0

    def reset(self):
        raise SystemExit(_RESET)

    def _panel(self, buffer):
        if self.fail_display:
            raise OSError(5)

    def feed(self):
        # No watchdog here. The app calls this on every key scan (20 ms), so the simulated
        # board uses it as its tick: it plays queued presses as level changes the key
        # scanner sees, and samples the heap every 2 s. (A task of its own would cost
        # heap.) "gap": a press begins at least that long after the previous one began --
        # a person's pace, whatever delays the command met on its way here.
        now = time.ticks_ms()
        if self._up_at is not None:
            if time.ticks_diff(now, self._up_at) >= 0:
                self._up_at = None
                for pin in self.keys_pins.values():
                    pin.level = 1 - self.key_active
                self._free_at = time.ticks_add(now, _GAP_MS)
        elif self._presses and time.ticks_diff(now, self._free_at) >= 0:
            stars, ms, gap = self._presses[0]
            if not gap or time.ticks_diff(now, self._last_press) >= gap:
                self._presses.pop(0)
                self._last_press = now
                self.keys_pins[stars].level = self.key_active
                self._up_at = time.ticks_add(now, max(ms, 1))
        if time.ticks_diff(now, self._sampled) >= _HEAP_EVERY_MS:
            self._sampled = now
            self.sample_heap()

    def event(self, obj):
        """Queue one event line for the simulator (bounded; oldest dropped and counted)."""
        if self.ctl_port <= 0:
            return
        lines = self._lines
        try:
            line = json.dumps(obj)
        except MemoryError:
            # The simulator's own lines must never stop the firmware (a board has no such
            # listener): the queued ones make room, and failing that this one is dropped.
            self.lines_dropped += len(lines) + 1
            self._queued = 0
            lines.clear()
            try:
                line = json.dumps(obj)
            except MemoryError:
                return
            self.lines_dropped -= 1
        while lines and (len(lines) >= _LINE_SLOTS or self._queued + len(line) > _LINE_BYTES):
            self._queued -= len(lines.pop(0))
            self.lines_dropped += 1
        lines.append(line)
        self._queued += len(line)

    # ---- the control channel ------------------------------------------------------------
    def sample_heap(self):
        # Live heap = what survives a collection; its highest sample is the footprint the
        # simulator reports (micropython.mem_peak() counts garbage too, so it only bounds it).
        gc.collect()
        live = gc.mem_alloc()
        if live > self.live_max:
            self.live_max = live
        return live

    def stats(self, kind="stats"):
        # kind "heap": the heap figures only; "stats": everything.
        app = self.app
        live = self.sample_heap()
        out = {"e": kind, "live": live, "live_max": self.live_max,
               "size": live + gc.mem_free(), "peak": micropython.mem_peak()}
        if kind == "heap":
            return out
        out["presses_dropped"] = self.presses_dropped
        out["lines_dropped"] = self.lines_dropped
        out["frames"] = self.display.frames
        if app is not None:
            r = app.rating
            j = app.journal
            out.update({"saved": app.saved, "refused_full": app.refused_full,
                        "flash_errors": app.flash_errors, "bad_records": app.bad_records,
                        "bad_downlinks": app.bad_downlinks, "evt_dropped": app.evt_dropped,
                        "resends": app.resends, "published": app.published,
                        "uplink_errors": app.uplink_errors, "draw_errors": app.draw_errors,
                        "misuse": r.misuse, "rapid": r.rapid, "unrated": r.unrated,
                        "jd": j.depth, "next": j.next_seq, "rc": app.client.reconnects,
                        "rx_dropped": getattr(app.client, "dropped_incoming", 0),
                        "rx_errors": getattr(app.client, "callback_errors", 0),
                        "state": app.rating.view().get("state"), "stuck": app.keys.stuck})
        return out

    def _command(self, cmd):
        # cmd: one command from the simulator, a dict
        c = cmd.get("c")
        if c == "press" or c == "hold":
            stars = cmd.get("stars")
            if stars not in self.keys_pins:
                return {"e": "error", "c": c, "why": "key"}  # no such key
            if len(self._presses) >= _PRESS_SLOTS:
                self.presses_dropped += 1
                return {"e": "error", "c": c, "why": "full"}  # the press queue
            self._presses.append((stars, cmd.get("ms", _PRESS_MS), cmd.get("gap", 0)))
            return None
        if c == "fb":
            return c  # streamed by _control, piece by piece (a whole copy would not fit)
        if c == "stats" or c == "heap":
            return self.stats(c)
        if c == "flash":
            self.fail_sync = bool(cmd.get("fail"))
            return {"e": "flash", "fail": self.fail_sync}
        if c == "display":
            self.fail_display = bool(cmd.get("fail"))
            return {"e": "display", "fail": self.fail_display}
        return {"e": "error", "c": c, "why": "c"}  # not a command we know

    def _flush(self, link):
        # Every queued event line into the link's output (named like the display's flush:
        # one interned name fewer on the device).
        lines = self._lines
        while lines:
            line = lines.pop(0)
            self._queued -= len(line)
            # The text itself (a str is a buffer of its UTF-8 bytes), then its newline: no
            # copy of a vote's line (some 400 bytes) on the heap on its way out.
            link.write(line)
            link.write(b"\n")

    async def _framebuffer(self, link, rid):
        # {"e": "fb", "w", "h", "id", "b": base64 of the framebuffer} written a few dozen
        # bytes at a time: the 2 KB framebuffer as one base64 string, in a JSON line, then
        # encoded, would need several copies of itself on the 64 KB heap at once.
        from binascii import b2a_base64

        self._flush(link)  # what the device said before this answer goes first
        d = self.display
        link.write(('{"e": "fb", "w": %d, "h": %d, "id": %s, "b": "'
                    % (d.width, d.height, json.dumps(rid))).encode())
        buf = memoryview(d.buffer)
        for i in range(0, len(buf), 48):
            link.write(b2a_base64(buf[i:i + 48])[:-1])  # 64 characters, no newline
            await link.drain()
        link.write(b'"}\n')
        await link.drain()

    async def _control(self):
        # Keeps a connection to the simulator; the device runs on without one. One task
        # polls the socket both ways (firmware/mqtt.py's Link, as the MQTT client uses: no
        # asyncio streams on the device's heap): every 10 ms while there is traffic, the
        # pause doubling to 40 ms while there is none.
        got = bytearray(_MAX_LINE)  # received, up to a whole line
        scratch = bytearray(_CHUNK)  # what one poll reads: nothing allocated while idle
        while True:
            try:
                link, _ = await open_link("127.0.0.1", self.ctl_port)
            except OSError:
                await asyncio.sleep_ms(500)
                continue
            hello = json.dumps({"e": "hello", "d": self.device_id, "rst": self.rst,
                                "board": self.name, "fw": VERSION})
            self._lines.insert(0, hello)
            self._queued += len(hello)
            end = 0
            pause = 10
            try:
                while True:
                    if self._lines:
                        pause = 10
                    self._flush(link)
                    await link.drain()
                    if end == len(got):
                        end = 0  # a line longer than any command: dropped
                    n = link.s.readinto(scratch, min(_CHUNK, len(got) - end))
                    if n == 0:
                        break  # the simulator closed the channel
                    if not n:
                        await asyncio.sleep_ms(pause)
                        pause = min(pause * 2, 40)
                        continue
                    pause = 10
                    got[end:end + n] = memoryview(scratch)[:n]
                    end += n
                    # Each whole line is a command, answered through event(); a partial
                    # last line waits at the start of got for the rest.
                    start = 0
                    while True:
                        nl = got.find(b"\n", start, end)
                        if nl < 0:
                            break
                        c = None
                        try:
                            c = json.loads(got[start:nl])
                            reply = self._command(c)
                        except (ValueError, TypeError, AttributeError, MemoryError):
                            reply = {"e": "error", "why": "bad"}  # not a command, or no room
                        if reply == "fb":
                            await self._framebuffer(link, c.get("id"))
                            reply = None
                        if reply is not None:
                            if isinstance(c, dict) and "id" in c:
                                reply["id"] = c["id"]
                            self.event(reply)
                        start = nl + 1
                    if start:
                        got[:end - start] = got[start:end]
                        end -= start
            except OSError:
                pass
            try:
                link.close()
            except OSError:
                pass
            await asyncio.sleep_ms(500)

    def start(self):
        if self.ctl_port > 0:
            asyncio.create_task(self._control())
