"""The benchmarks' shared kit: load worker processes, the baseline broker, CPU shares, medians.

- `Workers` starts `python -m simulator.bench_load` processes (one JSON job each), waits
  until every one is connected, says "go" to all at once and collects what they measured.
- `TwinBroker` is the baseline broker: a second mosquitto with exactly the configuration
  the hub writes for its own (hub/broker.py: same ACL, passwords, persistence, limits), in
  a folder and on a port of its own, holding the same device logins. Measuring mosquitto
  on the hub's own broker would leave the baseline's messages queued for the hub's
  persistent session, to be ingested the next time it connects.
- `CpuMeter` reads how much CPU each process used over a measurement (Linux /proc), which
  says what limits a figure on a shared machine.
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

from hub import PingjiaError
from simulator import build as fwbuild

ROOT = fwbuild.ROOT


class BenchError(PingjiaError):
    """A benchmark could not be set up or did not produce its figure."""


# ---- numbers ---------------------------------------------------------------------------------

def percentile(values: list, p: float) -> float | None:
    """The p-th percentile by nearest rank (the value below which p % of samples fall)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return round(value / baseline, 3)


def rounded(value: Any, digits: int = 1) -> Any:
    return round(value, digits) if isinstance(value, float) else value


# ---- CPU shares ------------------------------------------------------------------------------

def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of one process so far (None when it is gone)."""
    if not pid:
        return None
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used by named processes between start() and stop(), as cores busy (1.0 = one)."""

    def __init__(self, pids: dict[str, list[int]]):
        self.pids = pids
        self._before: dict[str, float] = {}
        self._t0 = 0.0
        self.shares: dict[str, float] = {}

    def _total(self, name: str) -> float:
        return sum(cpu_seconds(pid) or 0.0 for pid in self.pids[name])

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._before = {name: self._total(name) for name in self.pids}

    def stop(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        self.shares = {name: round((self._total(name) - self._before[name]) / elapsed, 2)
                       for name in self.pids}
        return self.shares


def machine_busy() -> float:
    """The 1-minute load average: how crowded the machine was (others' tests included)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


# ---- load worker processes -------------------------------------------------------------------

class Worker:
    def __init__(self, proc: asyncio.subprocess.Process, role: str):
        self.proc = proc
        self.role = role
        self.ready: dict = {}
        self.done: dict = {}

    async def read_event(self, timeout: float) -> dict:
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not line:
                err = b""
                if self.proc.stderr is not None:
                    try:
                        err = await asyncio.wait_for(self.proc.stderr.read(), 2)
                    except asyncio.TimeoutError:
                        pass
                tail = err.decode(errors="replace").strip().splitlines()
                raise BenchError("load worker (%s) ended: %s" % (
                    self.role, tail[-1] if tail else "no output"))
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("ev") == "error":
                raise BenchError("load worker (%s): %s" % (self.role, event.get("error")))
            return event

    async def send(self, obj: dict) -> None:
        if self.proc.stdin is None or self.proc.returncode is not None:
            return
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        try:
            await self.proc.stdin.drain()
        except ConnectionError:
            pass


class Workers:
    """A set of load workers that start, go and finish together."""

    def __init__(self):
        self.workers: list[Worker] = []

    async def start(self, jobs: list[dict], ready_timeout: float = 180.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for job in jobs:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "simulator.bench_load", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
                env=env, limit=64 * 1024 * 1024)
            worker = Worker(proc, job["role"])
            self.workers.append(worker)
            await worker.send(job)
        for worker in self.workers:
            worker.ready = await worker.read_event(ready_timeout)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def connected(self, role: str = "devices") -> int:
        return sum(int(w.ready.get("connected", 0)) for w in self.workers if w.role == role)

    async def go(self) -> None:
        await asyncio.gather(*(w.send({"cmd": "go"}) for w in self.workers))

    async def finish(self, roles: tuple[str, ...] = ()) -> None:
        await asyncio.gather(*(w.send({"cmd": "finish"}) for w in self.workers
                               if not roles or w.role in roles))

    async def results(self, role: str, timeout: float) -> list[dict]:
        out = []
        for worker in self.workers:
            if worker.role == role:
                worker.done = await worker.read_event(timeout)
                out.append(worker.done)
        return out

    async def close(self) -> None:
        for worker in self.workers:
            await worker.send({"cmd": "quit"})
            if worker.proc.stdin is not None:
                worker.proc.stdin.close()
        for worker in self.workers:
            try:
                await asyncio.wait_for(worker.proc.wait(), 10)
            except asyncio.TimeoutError:
                worker.proc.kill()
                await worker.proc.wait()
        self.workers = []


def split(items: list, parts: int) -> list[list]:
    """items dealt round-robin into at most `parts` non-empty lists."""
    parts = max(1, min(parts, len(items)))
    return [items[i::parts] for i in range(parts)]


def device_spec(provisioned: Any, host: str, port: int, next_seq: int = 1) -> dict:
    """What a load worker needs to emulate one provisioned device."""
    return {"d": provisioned.device_id, "key": provisioned.key_hex,
            "user": provisioned.mqtt_user, "password": provisioned.mqtt_password,
            "window": provisioned.window or "", "host": host, "port": port, "next": next_seq}


# ---- the baseline broker ---------------------------------------------------------------------

class TwinBroker:
    """mosquitto configured exactly as the hub configures its own, beside it (see above)."""

    def __init__(self, settings: Any, provisioned: dict, folder: str, port: int):
        from hub.broker import Broker

        self.settings = settings.replace(hub={"data_dir": os.path.abspath(folder)},
                                         broker={"port": port, "mode": "supervise"})
        self.provisioned = provisioned
        self.broker = Broker(self.settings)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.settings.broker.port

    def start(self) -> None:
        from hub.broker import BrokerFiles, PasswordFile, write_broker_files

        write_broker_files(self.settings)
        with PasswordFile(BrokerFiles.for_settings(self.settings).passwd) as passwords:
            for prov in self.provisioned.values():
                passwords.set(prov.mqtt_user, prov.mqtt_password)
        self.broker.start()

    @property
    def pid(self) -> int | None:
        return self.broker.pid

    def stop(self) -> None:
        self.broker.stop()
