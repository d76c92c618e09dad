"""`pingjia sim update`: a firmware update across a simulated fleet, with faults, while
citizens vote -- and proof that no device is left without working firmware and no vote is
lost.

The hall of `sim run` (simulator/run.py) with resilient citizens voting all along. The
hub's rollout engine (hub/updates.py) does the updating, driven through the same calls as
`pingjia hub release add` and `pingjia hub updates start`; the devices run the real
firmware's updater and boot selector (firmware/ota.py, firmware/bootsel.py). Three
rollouts, in order:

1. crash   an image that passes its hash but whose firmware raises at boot. The canaries
           try it, fall back to their old slot by themselves and say so; the rollout halts
           and no other device is ever offered it.
2. corrupt a good image whose copy in the hub's store was damaged after it was added (a
           flipped byte). The canaries download it, find the hash wrong and refuse it; the
           rollout halts.
3. good    a working new version, canaries first and then the rest a batch at a time, while
           devices lose power in the middle of their download and right after installing
           (on the way into, or during, their trial boot). Every device must end on it.

Afterwards: every device online and running the version the hub believes it runs, no
trial pending on any device, and the votes judged as `sim run` judges them (none lost,
doubled, altered or forged).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from hub import PingjiaError
from simulator import build as fwbuild
from simulator.citizens import Citizens
from simulator.live import LiveView
from simulator.run import Forgeries, Options, Session, _summary, check_options, in_workdir

BOARD = "sim-v1"  # hardware/boards/sim.json
POLL_S = 0.25  # how often the driver looks at the rollout (power cuts race the device)
PHASE_TIMEOUT_S = 240.0  # one rollout, from start to its end state, at most
OFF_S = (0.3, 1.5)  # how long a device stays without power


class UpdateError(PingjiaError):
    """The update run could not be set up or went wrong outside the devices' control."""


@dataclass
class UpdateOptions:
    canary: int = 2
    batch: int = 3
    download_cuts: int = 2  # power cuts of devices in the middle of a download
    install_cuts: int = 2  # power cuts right after a device reported "installed"
    bad_images: bool = True  # the crash and corrupt rollouts before the good one
    version: str = ""  # the new version (default: the current one + "-ota")


@dataclass
class Phase:
    name: str
    version: str
    rid: str = ""
    state: str = ""
    counts: dict = field(default_factory=dict)
    failures: dict = field(default_factory=dict)  # device -> why
    withdrawn: list = field(default_factory=list)  # offers pulled back when the rollout halted
    offered: list = field(default_factory=list)  # devices the rollout ever offered to
    cuts: list = field(default_factory=list)  # (device, when: download|install, off)
    seconds: float = 0.0


class Driver:
    """Adds releases, starts rollouts and cuts power, through the hub's own store."""

    def __init__(self, session: Session, rng: random.Random, say: Callable[[str], None]):
        from hub.store import Store

        self.session = session
        self.rng = rng
        self.say = say
        self.store = Store(session.hall.settings.db_path)
        self.images = os.path.join(session.workdir, "images")

    def close(self) -> None:
        close = getattr(self.store, "close", None)
        if close is not None:
            close()

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))

    async def release(self, version: str, variant: str, corrupt: bool = False) -> dict:
        """Build an image of the firmware (simulator/build.py) and add it as a release, as
        `pingjia hub release add` does; `corrupt` then flips one byte of the stored copy."""
        from hub import updates

        path, sha, size = await self._call(fwbuild.build_image, version, self.images, variant)
        with open(path, "rb") as f:
            image = f.read()
        rel = await self._call(updates.add_release, self.store, image, version, BOARD,
                               "sim update: %s image" % variant)
        if corrupt:
            damaged = bytearray(image)
            damaged[len(damaged) // 2] ^= 0x40
            await self._call(self._overwrite, rel["id"], bytes(damaged))
        self.say("release %s (%s image, %d bytes, sha256 %s…)%s" % (
            version, variant, size, sha[:12], ", its stored copy damaged" if corrupt else ""))
        return rel

    def _overwrite(self, release_id: int, image: bytes) -> None:
        # The disk fault: the stored image no longer matches the sha256 recorded for it.
        with self.store.transaction():
            self.store.conn.execute("UPDATE releases SET image = ? WHERE id = ?",
                                    (image, release_id))

    async def rollout(self, phase: Phase, uopts: UpdateOptions, cuts: tuple[int, int],
                      until: tuple[str, ...]) -> None:
        """Start the rollout of phase.version and follow it until it reaches a state in
        `until`, cutting power as asked on the way: cuts = (during download, after
        install)."""
        from hub import updates

        started = time.monotonic()
        view = await self._call(updates.start_rollout, self.store, phase.version, BOARD,
                                canary=uopts.canary, batch=uopts.batch, max_failures=0)
        phase.rid = view["rid"]
        self.say("rollout %s of %s: canary %d, batch %d" % (
            phase.rid, phase.version, uopts.canary, uopts.batch))
        download_left, install_left = cuts
        cut_devices: set[str] = set()
        cut_at: dict[str, float] = {}
        pending: list[asyncio.Task] = []
        offered: set[str] = set()
        deadline = started + PHASE_TIMEOUT_S
        while True:
            view = await self._call(updates.rollout, self.store, phase.rid)
            for d in view["device_list"]:
                device_id, state = d["device_id"], d["state"]
                if state != "pending":
                    offered.add(device_id)
                if device_id in cut_devices:
                    continue
                size = d.get("size") or 0
                # Each device is cut once its download passes a point drawn for it, so the
                # cuts land anywhere in the image, not just after the first chunk.
                at = cut_at.setdefault(device_id, self.rng.uniform(0.1, 0.8) * size)
                if (download_left and state == "downloading" and d.get("off")
                        and size and at <= d["off"] < size):
                    download_left -= 1
                    cut_devices.add(device_id)
                    phase.cuts.append((device_id, "download", d["off"]))
                    pending.append(asyncio.ensure_future(self._power_cycle(device_id)))
                elif install_left and state == "installing":
                    install_left -= 1
                    cut_devices.add(device_id)
                    phase.cuts.append((device_id, "install", d.get("off")))
                    pending.append(asyncio.ensure_future(self._power_cycle(device_id)))
            # A halt stops new offers, but a canary already installing carries on and
            # reports how its trial went: follow until nobody is in flight.
            if view["state"] in until and not any(
                    d["state"] in ("offered", "downloading", "installing")
                    for d in view["device_list"]):
                break
            if time.monotonic() > deadline:
                raise UpdateError("rollout %s of %s still %s after %.0f s: %s" % (
                    phase.rid, phase.version, view["state"], PHASE_TIMEOUT_S,
                    json.dumps(view["counts"])))
            await asyncio.sleep(POLL_S)
        await asyncio.gather(*pending)
        phase.state = view["state"]
        phase.counts = {k: v for k, v in view["counts"].items() if v}
        phase.failures = {d["device_id"]: d["why"] for d in view["device_list"]
                          if d["state"] == "failed"}
        phase.withdrawn = sorted(d["device_id"] for d in view["device_list"]
                                 if d["state"] == "withdrawn")
        phase.offered = sorted(offered)
        phase.seconds = round(time.monotonic() - started, 1)
        self.say("rollout %s %s in %.1f s: %s" % (
            phase.rid, phase.state, phase.seconds,
            ", ".join("%s %d" % kv for kv in sorted(phase.counts.items()))))

    async def _power_cycle(self, device_id: str) -> None:
        fleet = self.session.fleet
        await fleet.power_cut(device_id)
        await asyncio.sleep(self.rng.uniform(*OFF_S))
        await fleet.spawn(device_id, "power")

    async def settle(self, timeout: float = 120.0) -> None:
        """Until every device is online and idle again, and the hub has seen it come back."""
        fleet = self.session.fleet
        await fleet.wait_for(lambda: all(d.alive and d.connected for d in fleet.devices.values()),
                             timeout, "every device running and connected")
        await self.session.hub_sees_online(timeout)

    def firmware(self) -> dict[str, dict]:
        """device -> what it runs: the hub's view (fw from its latest report) and the
        device's own slot state (ota.json in its flash)."""
        from hub import updates

        facts = updates.device_facts(self.store, time.time())
        out = {}
        for device_id, dev in self.session.fleet.devices.items():
            state = {}
            try:
                with open(os.path.join(dev.workdir, "ota.json")) as f:
                    state = json.load(f)
            except (OSError, ValueError):
                pass  # a fresh unit that never updated has none: slot 0, nothing on trial
            fact = facts.get(device_id)
            out[device_id] = {"fw": fact.fw if fact else None,
                              "online": bool(fact and fact.online),
                              "slot": state.get("a", 0), "trial": state.get("t"),
                              "rolled_back": state.get("rb")}
        return out


def prepare(opts: Options, uopts: UpdateOptions) -> None:
    check_options(opts)
    if opts.hub_config:
        raise UpdateError("sim update runs its own hub: leave out --hub-config")
    if opts.devices < uopts.canary + 1:
        raise UpdateError("need more devices (%d) than canaries (%d): the rest must wait "
                          "for them" % (opts.devices, uopts.canary))
    if uopts.canary < 1:
        raise UpdateError("the update run needs at least one canary")


def run(opts: Options, uopts: UpdateOptions, say: Callable[[str], None] = lambda line: None,
        live: bool = False) -> dict:
    """One update run; returns the summary of `sim run` plus the rollouts' outcome."""
    prepare(opts, uopts)
    return in_workdir(opts, lambda workdir: _update(opts, uopts, workdir, say, LiveView(live)))


async def _update(opts: Options, uopts: UpdateOptions, workdir: str,
                  say: Callable[[str], None], live: LiveView) -> dict:
    from hub.flashing import firmware_version

    rng = random.Random(opts.seed)
    session = Session(opts, workdir, say)
    driver = None
    serving = None
    try:
        await session.open()
        fleet, hall, province = session.fleet, session.hall, session.province
        driver = Driver(session, random.Random(rng.getrandbits(64)), say)
        old = firmware_version()
        new = uopts.version or old + "-ota"
        citizens = Citizens(fleet, session.hub_api, rng, opts.mix, resilient=True)
        visits = session.windows_visits(opts.votes)
        # Citizens keep coming through all three rollouts: a pause between visits spreads
        # them over the run instead of the first seconds.
        serving = asyncio.gather(*(citizens.serve(d, hall.windows[d], n, pause_s=(1.0, 6.0))
                                   for d, n in visits.items() if n))
        deadline = session.started + opts.deadline_s

        def show(phase: str) -> None:
            live.show(session.progress(citizens, phase, opts.votes))

        phases = []
        if uopts.bad_images:
            crash = Phase("crash", new + "-crash")
            await driver.release(crash.version, "crash")
            await driver.rollout(crash, uopts, (0, 0), ("halted", "done", "cancelled"))
            phases.append(crash)
            await driver.settle()
            corrupt = Phase("corrupt", new + "-corrupt")
            await driver.release(corrupt.version, "good", corrupt=True)
            await driver.rollout(corrupt, uopts, (0, 0), ("halted", "done", "cancelled"))
            phases.append(corrupt)
            await driver.settle()
        good = Phase("good", new)
        await driver.release(good.version, "good")
        await driver.rollout(good, uopts, (uopts.download_cuts, uopts.install_cuts),
                             ("done", "halted", "cancelled"))
        phases.append(good)
        await driver.settle()
        say("rollouts over; the citizens finish their visits")
        await session.serve_out(serving, deadline, show)
        serving = None
        await session.drain(deadline, show)
        pstats, hub_status = await session.gather_counters()
        live.end()
        session.write_visits(citizens.outcome.visits)
        summary = _summary(opts, fleet, citizens.outcome.visits, province, pstats, hub_status,
                           Forgeries(), time.monotonic() - session.started,
                           time.monotonic() <= deadline, hall)
        summary.update(_judge(phases, driver.firmware(), old, new, uopts, fleet))
        summary["ok"] = bool(summary["ok"] and not summary["update_problems"])
        return summary
    finally:
        if serving is not None:
            serving.cancel()
        live.end()
        if driver is not None:
            driver.close()
        await session.close()


def _judge(phases: list[Phase], firmware: dict[str, dict], old: str, new: str,
           uopts: UpdateOptions, fleet: Any) -> dict:
    """What the rollouts must have done, as a list of problems (empty when all is well)."""
    problems = []
    by_name = {p.name: p for p in phases}
    for name, why in (("crash", "rolled back"), ("corrupt", "hash")):
        phase = by_name.get(name)
        if phase is None:
            continue
        if phase.state != "halted":
            problems.append("%s rollout ended %s, not halted" % (name, phase.state or "?"))
        # A canary still downloading when the other failed has its offer withdrawn.
        stray = [d for d in phase.offered if d not in phase.failures and d not in phase.withdrawn]
        if len(phase.offered) > uopts.canary or stray:
            problems.append("%s image went beyond the canaries: offered to %s" % (
                name, ", ".join(phase.offered)))
        wrong = {d: w for d, w in phase.failures.items() if why not in (w or "")}
        if wrong or not phase.failures:
            problems.append("%s canaries failed for the wrong reason: %s" % (
                name, json.dumps(wrong or "none failed")))
    good = by_name["good"]
    if good.state != "done":
        problems.append("good rollout ended %s: %s" % (good.state, json.dumps(good.counts)))
    for kind, wanted in (("download", uopts.download_cuts), ("install", uopts.install_cuts)):
        made = sum(1 for c in good.cuts if c[1] == kind)
        if made < min(wanted, len(fleet.devices)):
            problems.append("only %d of %d power cuts during %s happened" % (made, wanted, kind))
    for device_id, fw in sorted(firmware.items()):
        if fw["fw"] != new:
            problems.append("%s runs %s, not %s" % (device_id, fw["fw"], new))
        if fw["trial"] is not None:
            problems.append("%s still has a trial pending (slot %s)" % (device_id, fw["trial"]))
        if not fw["online"]:
            problems.append("%s is not online" % device_id)
    return {
        "version_before": old,
        "version_after": new,
        "rollouts": [{"name": p.name, "version": p.version, "rid": p.rid, "state": p.state,
                      "counts": p.counts, "failures": p.failures, "offered": p.offered,
                      "withdrawn": p.withdrawn,
                      "power_cuts": [{"device": d, "during": w, "off": o} for d, w, o in p.cuts],
                      "seconds": p.seconds} for p in phases],
        "firmware": firmware,
        "update_problems": problems,
    }


def format_update(summary: dict) -> str:
    lines = ["firmware %s -> %s" % (summary["version_before"], summary["version_after"])]
    for r in summary["rollouts"]:
        lines.append("rollout %-8s %-4s %-8s %5.1f s  %s" % (
            r["name"], r["rid"], r["state"], r["seconds"],
            ", ".join("%s %d" % kv for kv in sorted(r["counts"].items()))))
        for device_id, why in sorted(r["failures"].items()):
            lines.append("    %s failed: %s" % (device_id, why))
        for device_id in r["withdrawn"]:
            lines.append("    %s: offer withdrawn when the rollout halted" % device_id)
        for cut in r["power_cuts"]:
            lines.append("    power cut %s during %s (at byte %s)" % (
                cut["device"], cut["during"], cut["off"]))
    running: dict[str, int] = {}
    for fw in summary["firmware"].values():
        running[fw["fw"] or "?"] = running.get(fw["fw"] or "?", 0) + 1
    lines.append("devices running                  %s" % ", ".join(
        "%s on %s" % (n, v) for v, n in sorted(running.items())))
    for problem in summary["update_problems"]:
        lines.append("problem: %s" % problem)
    return "\n".join(lines)
