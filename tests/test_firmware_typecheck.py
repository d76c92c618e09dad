# The device firmware type-checks against the MicroPython ESP32 stubs (mypy, firmware/mypy.ini).
#
# The stub distributions install their .pyi files straight into site-packages, where mypy
# does not look for them (they are not PEP 561 packages) and which mypy refuses on its
# search path. So the check links them into a scratch directory: the stdlib stubs become a
# custom typeshed (--custom-typeshed-dir), the board modules (machine, network, time, ...)
# go on MYPYPATH. Run this file directly to see mypy's report:
#     .venv/bin/python tests/test_firmware_typecheck.py
import importlib.metadata
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRMWARE = os.path.join(ROOT, "firmware")
CONFIG = os.path.join(FIRMWARE, "mypy.ini")


def link_stubs(workdir):
    """Link the installed MicroPython stubs into workdir; returns (typeshed_dir, mypy_path)."""
    try:
        board = importlib.metadata.distribution("micropython-esp32-stubs")
        stdlib = importlib.metadata.distribution("micropython-stdlib-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("micropython-esp32-stubs is not installed: run `make test`, which installs it")
    typeshed = os.path.join(workdir, "typeshed")
    path = os.path.join(workdir, "stubs")
    os.makedirs(typeshed)
    os.makedirs(path)
    # The stdlib stubs ship a typeshed layout: stdlib/ (with VERSIONS) and stubs/.
    for name in _top_level(stdlib):
        target = os.path.join(typeshed if name in ("stdlib", "stubs") else path, name)
        os.symlink(str(stdlib.locate_file(name)), target)
    # The board stubs: one module or package per MicroPython module.
    for name in _top_level(board):
        os.symlink(str(board.locate_file(name)), os.path.join(path, name))
    return typeshed, path


def _top_level(dist):
    names = set()
    for f in dist.files or ():
        top = str(f).replace("\\", "/").split("/")[0]
        if top.endswith(".dist-info") or top.endswith(".md") or top == "__pycache__":
            continue
        if "/" in str(f).replace("\\", "/") or top.endswith(".pyi"):
            names.add(top)
    return sorted(names)


def run_mypy(workdir, *targets, cwd=FIRMWARE):
    if not os.path.isdir(os.path.join(workdir, "typeshed")):
        link_stubs(workdir)
    env = dict(os.environ, MYPYPATH=os.path.join(workdir, "stubs"))
    cmd = [sys.executable, "-m", "mypy", "--config-file", CONFIG,
           "--custom-typeshed-dir", os.path.join(workdir, "typeshed"),
           "--cache-dir", os.path.join(workdir, "cache"), "--no-error-summary",
           "--hide-error-context"] + list(targets)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def stubs():
    with tempfile.TemporaryDirectory() as workdir:
        yield workdir


def test_the_whole_firmware_type_checks_against_the_esp32_stubs(stubs):
    proc = run_mypy(stubs, ".")
    assert proc.returncode == 0, "mypy found problems in firmware/:\n" + proc.stdout + proc.stderr


def test_the_check_catches_apis_the_device_does_not_have(stubs, tmp_path):
    # Proof that the stubs are the ones in use: each line is fine on CPython or wrong on
    # the device, and every one must be reported.
    (tmp_path / "wrong.py").write_text(
        "import time\n"
        "import machine\n"
        "import sqlite3\n"
        "t = time.monotonic()\n"
        "p = machine.Pin(4, machine.Pin.IN)\n"
        "p.toggle_twice()\n"
        "time.ticks_diff(1)\n")
    proc = run_mypy(stubs, "wrong.py", cwd=str(tmp_path))
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert ('wrong.py:3: error: Cannot find implementation or library stub for module named'
            ' "sqlite3"') in out
    assert 'wrong.py:4: error: Module has no attribute "monotonic"' in out
    assert 'wrong.py:6: error: "Pin" has no attribute "toggle_twice"' in out
    assert "wrong.py:7: error:" in out


def test_micropython_apis_and_the_documented_portable_idioms_are_accepted(stubs, tmp_path):
    # The fallback idioms are the ones docs/rating.md ("Type check") tells engineers to use.
    (tmp_path / "right.py").write_text(
        "import gc\n"
        "import os\n"
        "import machine\n"
        "import network\n"
        "try:\n"
        "    from micropython import const\n"
        "except ImportError:\n"
        "    def const(x):  # type: ignore[misc]\n"
        "        return x\n"
        "try:\n"
        "    from time import ticks_diff, ticks_ms\n"
        "except ImportError:\n"
        "    def ticks_diff(a, b):  # type: ignore[no-redef]\n"
        "        return a - b\n"
        "X = const(3)\n"
        "d: int = ticks_diff(ticks_ms(), 0)\n"
        "machine.Pin(4, machine.Pin.IN, machine.Pin.PULL_UP).value()\n"
        "network.WLAN(network.STA_IF).isconnected()\n"
        "free: int = gc.mem_free()\n"
        "flag = getattr(os, 'O_RDONLY', 0) or os.O_RDONLY  # type: ignore[attr-defined]\n")
    proc = run_mypy(stubs, "right.py", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        result = run_mypy(scratch, ".")
        sys.stdout.write(result.stdout + result.stderr)
        sys.exit(result.returncode)
