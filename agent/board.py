"""The Raspberry Pi board: its board file, the five keys on GPIO and the OLED via luma.oled.

hardware/boards/rpi-evaluator.json is the reference board file; docs/agent.md has the
wiring. Hardware libraries are imported only when a real board is built, and only the
one asked for: RPi.GPIO refuses to import off a Pi, so tests pass gpiozero's MockFactory
pins and a luma.emulator device instead.
"""
import json
import os

from . import AgentError

DRIVERS = ("ssd1322", "ssd1306", "sh1106")
GPIO_LIBS = ("gpiozero", "rpi")
BCM_PINS = range(0, 28)  # the 40-pin header's GPIO 0..27
_U32 = 0xFFFFFFFF


class BoardError(AgentError):
    """A board file that is missing, unreadable or names hardware this agent cannot drive."""


def _bad(path, why):
    return BoardError("%s: %s" % (path, why))


def _int(value, lo, hi):
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def load_spec(path):
    """Read and check a Pi board file; returns the dict."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise BoardError("%s: no such board file" % path) from None
    except (OSError, ValueError) as exc:
        raise BoardError("%s: cannot read: %s" % (path, exc)) from None
    check_spec(spec, path)
    return spec


def check_spec(spec, path="board"):
    if not isinstance(spec, dict):
        raise _bad(path, "not a JSON object")
    name = spec.get("board")
    if not isinstance(name, str) or not name:
        raise _bad(path, "board: missing name")
    keys = spec.get("keys")
    if not isinstance(keys, list) or len(keys) != 5:
        raise _bad(path, "keys: need five")
    stars, pins, actives = set(), set(), set()
    for key in keys:
        if not isinstance(key, dict) or not _int(key.get("stars"), 1, 5):
            raise _bad(path, "keys: each needs stars 1..5")
        if not _int(key.get("pin"), BCM_PINS.start, BCM_PINS.stop - 1):
            raise _bad(path, "keys: pin of %d stars is not a BCM GPIO 0..27" % key["stars"])
        if key.get("pull", "up") not in ("up", "down", "none"):
            raise _bad(path, "keys: pull must be up, down or none")
        stars.add(key["stars"])
        pins.add(key["pin"])
        actives.add(key.get("active", 0 if key.get("pull", "up") == "up" else 1))
    if len(stars) != 5 or len(pins) != 5:
        raise _bad(path, "keys: stars and pins must all differ")
    if len(actives) != 1 or actives - {0, 1}:
        raise _bad(path, "keys: all keys need the same active level, 0 or 1")
    displays = spec.get("displays")
    if not isinstance(displays, dict) or not displays:
        raise _bad(path, "displays: missing")
    for dname, dspec in displays.items():
        _check_display(dspec, "%s: displays.%s" % (path, dname))
    if spec.get("display") not in displays:
        raise _bad(path, "display: must name one of displays")
    uplink = spec.get("uplink", {"kind": "mqtt"})
    if not isinstance(uplink, dict) or uplink.get("kind") not in ("mqtt", "serial"):
        raise _bad(path, "uplink: kind must be mqtt or serial")
    if uplink["kind"] == "serial" and not isinstance(uplink.get("port"), str):
        raise _bad(path, "uplink: a serial uplink needs a port")
    flash = spec.get("flash", {})
    if not isinstance(flash, dict) or not _int(flash.get("journal_segments", 64), 2, 4096) \
            or not _int(flash.get("segment_bytes", 16384), 1024, 1 << 24):
        raise _bad(path, "flash: journal_segments 2..4096, segment_bytes 1024..16 MB")
    return spec


def _check_display(dspec, where):
    if not isinstance(dspec, dict) or dspec.get("driver") not in DRIVERS:
        raise BoardError("%s: driver must be one of %s" % (where, ", ".join(DRIVERS)))
    if dspec.get("bus") not in ("spi", "i2c"):
        raise BoardError("%s: bus must be spi or i2c" % where)
    if not _int(dspec.get("width"), 8, 512) or not _int(dspec.get("height"), 8, 256):
        raise BoardError("%s: width and height" % where)
    spi_pins = _int(dspec.get("dc"), 0, 27) and _int(dspec.get("res"), 0, 27)
    if dspec["bus"] == "spi" and not spi_pins:
        raise BoardError("%s: spi needs dc and res GPIOs" % where)
    if dspec.get("rotate", 0) not in (0, 1, 2, 3):
        raise BoardError("%s: rotate must be 0..3" % where)


def display_spec(spec, name=None):
    """The display entry to use: `name`, else the board file's `display`."""
    name = name or spec["display"]
    if name not in spec["displays"]:
        raise BoardError("display %s: not in the board file (%s)"
                         % (name, ", ".join(sorted(spec["displays"]))))
    return spec["displays"][name]


def journal_geometry(spec, state_dir):
    """(journal dir, segments, segment bytes); a relative dir is under state_dir."""
    flash = spec.get("flash", {})
    folder = flash.get("journal_dir", "journal")
    if not os.path.isabs(folder):
        folder = os.path.join(state_dir, folder)
    return folder, flash.get("journal_segments", 64), flash.get("segment_bytes", 16384)


# -- keys -------------------------------------------------------------------------------------

def gpiozero_keys(keys, pin_factory=None):
    """({stars: read()}, active level, [devices]) with gpiozero input devices.

    read() returns the device's value, already 1 for a pressed key whatever the wiring,
    so the active level handed to evaluator.keys.Keys is 1."""
    from gpiozero import DigitalInputDevice

    pins, devices = {}, []
    for key in keys:
        pull = key.get("pull", "up")
        if pull == "none":
            device = DigitalInputDevice(key["pin"], pull_up=None,
                                        active_state=bool(key.get("active", 0)),
                                        pin_factory=pin_factory)
        else:
            device = DigitalInputDevice(key["pin"], pull_up=pull == "up", pin_factory=pin_factory)
        devices.append(device)
        pins[key["stars"]] = (lambda d=device: d.value)
    return pins, 1, devices


def rpi_gpio_keys(keys):
    """The same with RPi.GPIO (imported here: it refuses to import off a Pi)."""
    try:
        import RPi.GPIO as GPIO
    except (ImportError, RuntimeError) as exc:
        raise BoardError("RPi.GPIO: %s (use --gpio gpiozero off a Pi)" % exc) from None
    GPIO.setmode(GPIO.BCM)
    pins = {}
    for key in keys:
        pull = {"up": GPIO.PUD_UP, "down": GPIO.PUD_DOWN}.get(key.get("pull", "up"), GPIO.PUD_OFF)
        GPIO.setup(key["pin"], GPIO.IN, pull_up_down=pull)
        pins[key["stars"]] = (lambda p=key["pin"]: GPIO.input(p))
    active = keys[0].get("active", 0 if keys[0].get("pull", "up") == "up" else 1)
    return pins, active, [GPIO]


# -- display ----------------------------------------------------------------------------------

def make_display(dspec):
    """The luma.oled device for a display entry of the board file."""
    from luma.core.interface.serial import i2c, spi
    from luma.oled import device as oled

    if dspec["bus"] == "spi":
        bus = spi(port=dspec.get("spi_port", 0), device=dspec.get("spi_device", 0),
                  gpio_DC=dspec["dc"], gpio_RST=dspec["res"],
                  bus_speed_hz=dspec.get("bus_speed_hz", 8000000))
    else:
        bus = i2c(port=dspec.get("i2c_port", 1), address=dspec.get("address", 0x3C))
    cls = getattr(oled, dspec["driver"])
    return cls(bus, width=dspec["width"], height=dspec["height"], rotate=dspec.get("rotate", 0))


# -- the board --------------------------------------------------------------------------------

def _proc_first(path, parse, default=None):
    try:
        with open(path) as f:
            return parse(f.read())
    except (OSError, ValueError, IndexError):
        return default


def _meminfo_available(text):
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _wireless_level(text):
    # /proc/net/wireless: two header lines, then "wlan0: 0000   70.  -40.  -256 ...".
    lines = text.splitlines()[2:]
    if not lines:
        return None
    return int(float(lines[0].split()[3]))


def boot_reset_cause(uptime_s=None):
    """"power" when the system booted recently (the agent starts at boot), else "soft"
    (the service was restarted, by systemd after a crash or by hand)."""
    if uptime_s is None:
        uptime_s = _proc_first("/proc/uptime", lambda t: float(t.split()[0]), 0.0)
    return "power" if uptime_s < 300 else "soft"


class PiBoard:
    """What the runtime needs from the hardware: key readers, the display, health."""

    def __init__(self, spec, keys_pins, key_active, display=None, dspec=None, closers=(),
                 reset_cause=None):
        self.spec = spec
        self.name = spec["board"]
        self.keys_pins = keys_pins
        self.key_active = key_active
        self.display = display
        self.display_spec = dspec or {}
        self.photo = bool(self.display_spec.get("photo", False))
        self._closers = list(closers)
        self._reset = reset_cause or boot_reset_cause()

    def reset_cause(self):
        return self._reset

    def rssi(self):
        """Wi-Fi signal in dBm, or None on Ethernet (the field is then left out)."""
        return _proc_first("/proc/net/wireless", _wireless_level)

    def free_memory(self):
        """Available memory in bytes, capped to the protocol's u32 `heap` field."""
        return min(_proc_first("/proc/meminfo", _meminfo_available, 0), _U32)

    def close(self):
        for thing in self._closers:
            try:
                if hasattr(thing, "cleanup"):
                    thing.cleanup()
                else:
                    thing.close()
            except Exception:  # noqa: BLE001 - closing at exit: nothing left to protect
                pass
        if self.display is not None:
            try:
                self.display.cleanup()
            except Exception:  # noqa: BLE001
                pass


def open_board(spec, gpio="gpiozero", display_name=None, pin_factory=None, display=None,
               reset_cause=None, log=None):
    """Build the board from its spec. `display` (a luma device) replaces the panel, for
    tests and for a panel that is not in the file; a panel that fails to start leaves the
    board without display (votes still work; the heartbeat says disp=1)."""
    if gpio not in GPIO_LIBS:
        raise BoardError("gpio: must be one of %s" % ", ".join(GPIO_LIBS))
    dspec = display_spec(spec, display_name)
    if gpio == "rpi":
        pins, active, closers = rpi_gpio_keys(spec["keys"])
    else:
        pins, active, closers = gpiozero_keys(spec["keys"], pin_factory)
    if display is None:
        try:
            display = make_display(dspec)
        except Exception as exc:  # noqa: BLE001 - luma raises several kinds for a dead bus
            if log is not None:
                log.error("display %s did not start: %s", dspec["driver"], exc)
            display = None
    return PiBoard(spec, pins, active, display, dspec, closers, reset_cause)
