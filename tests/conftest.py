# Shared fixtures: free ports, the MicroPython binary, a throwaway mosquitto.
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The portable core is imported as the device sees it (`evaluator`, `mqtt` from firmware/),
# and tests read their vectors relative to the repo root, as tests/core/run.py does.
if os.path.join(ROOT, "firmware") not in sys.path:
    sys.path.append(os.path.join(ROOT, "firmware"))
os.chdir(ROOT)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def micropython_cmd():
    """The MicroPython unix port: the venv's (from PyPI) first, then one on PATH."""
    venv = os.path.join(os.path.dirname(sys.executable), "micropython")
    if os.path.exists(venv):
        return venv
    found = shutil.which("micropython")
    if not found:
        pytest.fail("no micropython command: run `make test`, which installs it")
    return found


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("nothing listening on port %d" % port)


class Mosquitto:
    """A plain mosquitto on loopback for client tests (anonymous, no ACL)."""

    def __init__(self, workdir, port):
        self.port = port
        self.conf = os.path.join(workdir, "mosquitto.conf")
        os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
        with open(self.conf, "w") as f:
            f.write("listener %d 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    "persistence_location %s/\nuser root\n" % (port, os.path.join(workdir, "data")))
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([mosquitto_cmd(), "-c", self.conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def mosquitto_cmd():
    """mosquitto from PATH, or from sbin (root's PATH has it; a plain user's may not)."""
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.fail("mosquitto is not installed: run `make test`, which installs it")


@pytest.fixture
def mosquitto(tmp_path):
    broker = Mosquitto(str(tmp_path / "broker"), free_port())
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def micropython():
    return micropython_cmd()
