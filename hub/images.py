"""Firmware images: the one file a counter evaluator's app slot holds.

An image is a ROMFS image (MicroPython's `vfs.VfsRom` format) of the compiled firmware for
one board: every module of firmware/ compiled with mpy-cross (simulator/build.py), plus the
simulated board's own modules when the board is the simulated one, never on a real board.
flash.sh writes it into slot 0 (docs/technician.md); the hub's `pingjia hub release add`
takes the same file for an update over the air (docs/protocol.md), and
`pingjia device image --board B --out FILE` makes it.

The image must hold the board's entry module: the boot selector (firmware/bootsel.py, the
unit's /main.py) mounts the slot at /rom and imports `start` on a board, `simdevice` on the
simulated one. An image without it could never boot, so it is refused here.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import NamedTuple

from hub import PingjiaError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUILD = os.path.join(ROOT, "build", "device-mpy")
# Boards whose image carries the simulator's modules (simboard, simdevice) and boots them.
SIM_BOARDS = ("sim-v1",)
ENTRY = {"sim-v1": "simdevice"}  # the module bootsel.py imports; every other board: start
DEFAULT_ENTRY = "start"


class ImageError(PingjiaError):
    """The firmware image could not be built."""


class Image(NamedTuple):
    """A built image: where it is, what it is. Unpacks as (path, sha256, size, version)."""
    path: str
    sha256: str
    size: int
    version: str


def firmware_version(root=ROOT):
    """evaluator.VERSION as written in firmware/evaluator/__init__.py."""
    path = os.path.join(root, "firmware", "evaluator", "__init__.py")
    with open(path) as f:
        for line in f:
            if line.startswith("VERSION"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def entry_module(board_name):
    return ENTRY.get(board_name, DEFAULT_ENTRY)


def image_modules(board_name, build_dir, root=ROOT):
    """The compiled modules (paths inside the build, e.g. 'evaluator/codec.mpy') that go
    into `board_name`'s image, sorted."""
    from simulator import build as fwbuild

    sim_only = {name[:-3] + ".mpy" for name in fwbuild.SIM_MODULES}
    modules = sorted(fwbuild.sources(root))
    if board_name not in SIM_BOARDS:
        modules = [m for m in modules if m not in sim_only]
    missing = [m for m in modules if not os.path.exists(os.path.join(build_dir, m))]
    if missing:
        raise ImageError("build %s lacks %s: build it first" % (build_dir, ", ".join(missing)))
    return modules


def mpy_version(build_dir, modules):
    """The .mpy format version of the build (the second byte of every .mpy header)."""
    for rel in modules:
        with open(os.path.join(build_dir, rel), "rb") as f:
            head = f.read(2)
        if len(head) == 2:
            return head[1]
    return None


def default_path(build_dir, board_name):
    return "%s-%s.romfs" % (build_dir.rstrip(os.sep), board_name)


def build_image(board="esp32s3-evaluator", build_dir=DEFAULT_BUILD, out=None, root=ROOT,
                mpy_cross=None):
    """Compile the firmware (incremental) and pack `board`'s image; returns an Image.

    `board` is a board file name (`sim`, `esp32s3-evaluator`), a path, or a loaded
    hub.flashing.Board. The image is written to `out` (default: beside the build,
    `<build_dir>-<board>.romfs`), atomically, and only when its content changed."""
    from simulator import build as fwbuild

    if isinstance(board, str):
        from hub.flashing import load_board
        board = load_board(board)
    try:
        fwbuild.build(out_dir=build_dir, root=root, mpy_cross=mpy_cross)
    except fwbuild.BuildError as exc:
        raise ImageError(str(exc))
    modules = image_modules(board.name, build_dir, root)
    entry = entry_module(board.name) + ".mpy"
    if entry not in modules:
        raise ImageError("firmware for %s has no %s (the module the boot selector starts)"
                         % (board.name, entry[:-4]))
    data = fwbuild.pack_romfs(build_dir, modules)
    path = out or default_path(build_dir, board.name)
    _write_if_changed(path, data)
    return Image(os.path.abspath(path), hashlib.sha256(data).hexdigest(), len(data),
                 firmware_version(root))


def _write_if_changed(path, data):
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return
    except OSError:
        pass
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # a release file, not a secret (mkstemp makes it 0600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
