"""`pingjia sim chaos`: the simulated hall while things break, and proof that no vote is lost.

The hall of `sim run` (simulator/run.py) with resilient citizens, the devices routed through
the network proxy (simulator/proxy.py) and the provincial receiver's fault switch on. While
citizens vote, faults are injected at random, drawn from a random stream of their own so a
seed gives the same sequence of faults (kind, mode, target, duration, gap) every time:

- power:    a device process is SIGKILLed and booted again after a pause. Mode "press"
            waits for the next citizen's deciding key press (on whichever device comes
            first) and cuts that device 0-250 ms later, racing the journal write and the
            "thank you"; mode "any" cuts the drawn device at once, whatever it is doing.
- network:  one device's link dropped ("drop") or frozen ("stall"), or every link dropped
            at once ("hall"), for a few seconds.
- broker:   mosquitto SIGKILLed ("kill": what it had not saved is gone) or stopped
            ("term"); the hub's supervisor starts it again.
- hub:      the hub process SIGKILLed, started again after a pause.
- province: the receiver answers errors, times out, drops the answer after storing, or is
            slow, for a few seconds.

Each enabled kind fires at least once: the first round of faults takes every kind in a
shuffled order, and any kind still missing when the citizens are done fires then. At the
end everything is healed (links up, receiver ok, hub and broker running, every device
booted and online) and the run waits until the province holds every durable record before
it judges. docs/simulator.md describes the fault model and how to replay a seed.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp

from simulator.citizens import Citizens
from simulator.live import LiveView
from simulator.run import (Forgeries, Options, Session, SimError, _summary, _victim,
                           check_options, in_workdir)

FAULT_KINDS = ("power", "network", "broker", "hub", "province")
# How often each kind is drawn after the first round: faults of one device are common,
# a broker or hub crash (which takes the whole hall's link away) is rarer.
WEIGHTS = {"power": 3, "network": 3, "province": 2, "broker": 1, "hub": 1}
MODES = {
    "power": (("press", 0.6), ("any", 0.4)),
    "network": (("drop", 0.45), ("stall", 0.35), ("hall", 0.2)),
    "broker": (("kill", 0.6), ("term", 0.4)),
    "hub": (("kill", 1.0),),
    "province": (("error", 0.35), ("timeout", 0.25), ("drop", 0.2), ("slow", 0.2)),
}
# How long each kind of fault lasts (seconds, drawn uniformly): power is the time the
# device stays off, network and province the outage, hub the time until it is restarted.
DURATION_S = {"power": (0.3, 2.5), "network": (1.0, 8.0), "broker": (0.0, 0.0),
              "hub": (0.5, 4.0), "province": (2.0, 10.0)}
PRESS_RACE_S = (0.0, 0.25)  # from the deciding press to the power cut (mode "press")
ARM_TIMEOUT_S = 10.0  # a "press" cut with no press on its device by then cuts anyway
MAX_ACTIVE = 3  # faults under way at once, at most
# The hub of a chaos hall gives up on a silent province after 3 s and never backs off for
# longer than 4 s, so outages drain in seconds (production defaults: 10 s and 60 s).
HUB_PROVINCE = {"timeout_s": 3.0, "retry_max_s": 4.0}
PROMPT_TTL_S = 30
PROVINCE_TIMEOUT_HOLD_MS = 4000  # longer than HUB_PROVINCE["timeout_s"]


class ChaosError(SimError):
    """The chaos run was asked for something it cannot do."""


def parse_kinds(text: str) -> tuple[str, ...]:
    """"power,network" -> ("power", "network"); "all" -> every kind."""
    if text.strip() in ("all", ""):
        return FAULT_KINDS
    kinds = []
    for name in text.split(","):
        name = name.strip()
        if name not in FAULT_KINDS:
            raise ChaosError("unknown fault kind %r (kinds: %s)" % (name, ", ".join(FAULT_KINDS)))
        if name not in kinds:
            kinds.append(name)
    return tuple(kinds)


@dataclass
class Fault:
    """One drawn fault: what, how, on whom, for how long, and how long before the next."""

    kind: str
    mode: str
    target: str | None  # a device id for power and single-device network faults
    duration_s: float
    gap_s: float  # wait after starting this one before drawing the next
    race_s: float = 0.0  # power "press": delay from the press to the cut


class FaultPlan:
    """The seeded stream of faults. Draws depend only on the seed and the order of draws,
    never on how the run is going, so a seed replays the same faults."""

    def __init__(self, seed: int, kinds: tuple[str, ...], devices: list[str], every_s: float):
        self.rng = random.Random("chaos:%d" % seed)
        self.kinds = kinds
        self.devices = sorted(devices)
        self.every_s = every_s
        self._first = list(kinds)
        self.rng.shuffle(self._first)

    def next(self) -> Fault:
        rng = self.rng
        kind = self._first.pop(0) if self._first else rng.choices(
            self.kinds, [WEIGHTS[k] for k in self.kinds])[0]
        modes = MODES[kind]
        roll, mode = rng.random(), modes[-1][0]
        for name, share in modes:
            if roll < share:
                mode = name
                break
            roll -= share
        target = rng.choice(self.devices)
        lo, hi = DURATION_S[kind]
        duration = round(rng.uniform(lo, hi), 2)
        gap = round(rng.expovariate(1.0 / self.every_s), 2) if self.every_s > 0 else 0.0
        race = round(rng.uniform(*PRESS_RACE_S), 3)
        if kind == "network" and mode == "hall":
            target = None
            duration = round(min(duration, 5.0), 2)
        return Fault(kind, mode, target if kind in ("power", "network") else None, duration,
                     gap, race)


class Chaos:
    """Injects a FaultPlan into a running Session and heals it all at the end."""

    def __init__(self, session: Session, plan: FaultPlan, log_path: str):
        self.session = session
        self.plan = plan
        self.log_path = log_path
        self.counts = {k: 0 for k in plan.kinds}
        self.modes: dict[str, int] = {}
        self.skipped = 0
        self.hub_restarts = 0
        self.broker_restarts = 0
        self._busy: set[str] = set()  # "power:D001", "network:D002", "hub", "broker", ...
        self._tasks: set[asyncio.Task] = set()
        self._armed: asyncio.Future | None = None  # a "press" power cut waiting for a press
        self._off: set[str] = set()  # devices a power fault holds off right now
        self._healing = asyncio.Event()
        self._paused = 0
        self._started = time.monotonic()
        self.errors: list[str] = []
        self.while_voting: dict[str, int] = {}  # counts when the citizens were done

    # ---- bookkeeping ------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._busy)

    def calm(self) -> bool:
        """No broker or hub fault under way (the rogue client needs a broker)."""
        return not ({"hub", "broker"} & self._busy)

    def pause(self) -> None:
        self._paused += 1

    def resume(self) -> None:
        self._paused -= 1

    def _log(self, event: str, fault: Fault | None = None, **extra: Any) -> None:
        entry: dict[str, Any] = {"t": round(time.monotonic() - self._started, 2), "event": event}
        if fault is not None:
            entry.update(kind=fault.kind, mode=fault.mode, target=fault.target,
                         for_s=fault.duration_s)
        entry.update(extra)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    async def _wait(self, seconds: float) -> None:
        """Sleep, but end early once healing starts."""
        try:
            await asyncio.wait_for(self._healing.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    # ---- the citizens' hook ----------------------------------------------------------------
    def on_decide(self, device_id: str) -> None:
        fut, self._armed = self._armed, None
        if fut is not None and not fut.done():
            fut.set_result(device_id)

    # ---- injecting ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Draw and inject faults until cancelled."""
        while True:
            while self._paused or self.active >= MAX_ACTIVE:
                await asyncio.sleep(0.2)
            fault = self.plan.next()
            self.start(fault)
            await asyncio.sleep(fault.gap_s)

    def start(self, fault: Fault) -> bool:
        key = self._key(fault)
        if key is None or key in self._busy or self._healing.is_set():
            self.skipped += 1
            self._log("skipped", fault)
            return False
        self._busy.add(key)
        task = asyncio.ensure_future(self._inject(fault, key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _key(self, fault: Fault) -> str | None:
        session = self.session
        if fault.kind == "power":
            if fault.mode == "press":
                return "power:press"  # one armed at a time; the device is whoever presses
            dev = session.fleet.devices[fault.target]
            return None if not dev.alive else "power:" + fault.target
        if fault.kind == "network":
            if fault.target is None:
                return "network:hall" if not any(k.startswith("network:") for k in self._busy) \
                    else None
            return None if "network:hall" in self._busy else "network:" + fault.target
        return fault.kind

    def _fired(self, fault: Fault, mode: str | None = None) -> None:
        """Count a fault once it took effect (a drawn one may find nothing to break)."""
        self.counts[fault.kind] += 1
        name = "%s.%s" % (fault.kind, mode or fault.mode)
        self.modes[name] = self.modes.get(name, 0) + 1

    async def _inject(self, fault: Fault, key: str) -> None:
        try:
            await getattr(self, "_" + fault.kind)(fault)
        except Exception as exc:  # noqa: BLE001 - one failed injection must not end the run
            self.errors.append("%s.%s: %s" % (fault.kind, fault.mode, exc))
            self._log("error", fault, error=str(exc))
        finally:
            self._busy.discard(key)

    async def _power(self, fault: Fault) -> None:
        fleet = self.session.fleet
        device_id = fault.target
        mode = fault.mode
        if mode == "press":
            fut = asyncio.get_running_loop().create_future()
            self._armed = fut
            self._log("armed", fault, race_s=fault.race_s)
            try:
                device_id = await asyncio.wait_for(asyncio.shield(fut), ARM_TIMEOUT_S) \
                    or device_id
                await asyncio.sleep(fault.race_s)
            except asyncio.TimeoutError:
                mode = "any"  # nobody pressed in time: cut the drawn device anyway
            finally:
                if self._armed is fut:
                    self._armed = None
        dev = fleet.devices[device_id]
        if not dev.alive or device_id in self._off:
            self._log("power_already_off", fault, device=device_id)
            return
        self._off.add(device_id)
        try:
            await self._cycle(fault, device_id, mode)
        finally:
            self._off.discard(device_id)

    async def _cycle(self, fault: Fault, device_id: str, mode: str) -> None:
        fleet = self.session.fleet
        state = fleet.devices[device_id].state
        found = await fleet.power_cut(device_id)
        self._fired(fault, mode)
        self._log("power_cut", fault, device=device_id, state=state, cut_as=mode,
                  durable_unreported=[s.seq for s in found])
        await self._wait(fault.duration_s)
        await fleet.spawn(device_id, "power")
        self._log("power_on", fault, device=device_id)

    async def _network(self, fault: Fault) -> None:
        proxy = self.session.proxy
        target = fault.target
        if fault.mode == "stall":
            proxy.stall(target)
        else:
            proxy.drop(target)
        self._fired(fault)
        self._log("network_" + fault.mode, fault)
        await self._wait(fault.duration_s)
        proxy.heal(target)
        self._log("network_up", fault)

    async def _broker(self, fault: Fault) -> None:
        hall = self.session.hall
        pid = hall.broker_pid()
        if pid is None:
            self._log("broker_absent", fault)
            return
        try:
            os.kill(pid, signal.SIGKILL if fault.mode == "kill" else signal.SIGTERM)
        except ProcessLookupError:
            return
        self._fired(fault)
        self._log("broker_" + fault.mode, fault, pid=pid)
        # The hub's supervisor brings it back; wait for that so the next broker fault
        # hits the new one (if the hub is down too, its restart starts a broker).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while loop.time() < deadline:
            now = hall.broker_pid()
            if now is not None and now != pid:
                self.broker_restarts += 1
                self._log("broker_up", fault, pid=now)
                return
            await asyncio.sleep(0.2)
        self._log("broker_not_back", fault)

    async def _hub(self, fault: Fault) -> None:
        hub = self.session.hall.service("hub")
        await asyncio.get_running_loop().run_in_executor(None, hub.kill)
        self._fired(fault)
        self._log("hub_killed", fault)
        await self._wait(fault.duration_s)
        await self._restart_hub()
        self._log("hub_up", fault)

    async def _restart_hub(self) -> None:
        hub = self.session.hall.service("hub")
        if hub is None or hub.alive():
            return
        hub.restart()
        self.hub_restarts += 1
        await self.session.hall.wait_ready(self.session.http, timeout=90)

    async def _province(self, fault: Fault) -> None:
        spec: dict[str, Any] = {"mode": fault.mode, "for_s": fault.duration_s}
        if fault.mode == "error":
            spec["status"] = 503 if fault.duration_s < 6 else 500
        elif fault.mode == "timeout":
            spec["delay_ms"] = PROVINCE_TIMEOUT_HOLD_MS
        elif fault.mode == "slow":
            spec["delay_ms"] = int(500 + 2000 * (fault.duration_s - 2.0) / 8.0)
        await self._set_province(spec)
        self._fired(fault)
        self._log("province_" + fault.mode, fault, spec=spec)
        await self._wait(fault.duration_s)
        await self._set_province({"mode": "ok"})
        self._log("province_ok", fault)

    async def _set_province(self, spec: dict) -> None:
        url = self.session.hall.province_url + "/_control/faults"
        async with self.session.http.post(url, json=spec,
                                          timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                raise ChaosError("province fault switch: HTTP %d" % resp.status)

    # ---- the end ------------------------------------------------------------------------------
    async def finish(self, runner: asyncio.Task) -> None:
        """Stop drawing, fire every kind that never fired, then heal everything."""
        self.while_voting = dict(self.counts)
        runner.cancel()
        try:
            await runner
        except asyncio.CancelledError:
            pass
        for _ in range(20):
            missing = [k for k in self.plan.kinds if not self.counts[k]]
            if not missing:
                break
            fault = self.plan.next()
            if fault.kind in missing:
                if fault.kind == "power":
                    fault.mode = "any"  # the citizens are gone: no press to race
                self.start(fault)
                await self._settle()
        await self.heal()

    async def _settle(self) -> None:
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def heal(self) -> None:
        self._healing.set()
        if self._armed is not None and not self._armed.done():
            self._armed.set_result(None)
        await self._settle()
        session = self.session
        if session.proxy is not None:
            session.proxy.heal(None)
        if "province" in self.plan.kinds:
            await self._set_province({"mode": "ok"})
        await self._restart_hub()
        fleet = session.fleet
        for device_id, dev in fleet.devices.items():
            if not dev.alive and dev.killed:
                await fleet.spawn(device_id, "power")
        self._log("healed")
        await fleet.wait_for(lambda: all(d.connected for d in fleet.devices.values()),
                             120 + len(fleet.devices), "every device back online")

    def summary(self) -> dict:
        return {
            "faults": dict(self.counts),
            "faults_while_voting": dict(self.while_voting),
            "fault_modes": dict(sorted(self.modes.items())),
            "faults_skipped": self.skipped,
            "faults_missing": [k for k in self.plan.kinds if not self.counts[k]],
            "fault_errors": self.errors,
            "hub_restarts": self.hub_restarts,
            "broker_restarts": self.broker_restarts,
        }


# ---- the run ----------------------------------------------------------------------------------

@dataclass
class ChaosOptions:
    kinds: tuple[str, ...] = FAULT_KINDS
    every_s: float = 3.0  # mean gap between faults (exponentially distributed)
    attempts: int = 4  # prompts a disrupted visit may try


def prepare(opts: Options, chaos: ChaosOptions) -> None:
    check_options(opts)
    if opts.hub_config and {"hub", "broker"} & set(chaos.kinds):
        raise ChaosError("with --hub-config the hub and broker are not ours to kill: "
                         "choose --faults among power,network,province")
    opts.via_proxy = opts.via_proxy or "network" in chaos.kinds
    if opts.mix.prompt_ttl_s is None:
        # A prompt stranded on a device (its citizen gave up after a fault) frees the
        # device after this long rather than the hub's default minute.
        opts.mix.prompt_ttl_s = PROMPT_TTL_S
    opts.province_faults = True
    if not opts.hub_config:
        opts.hub_province = dict(HUB_PROVINCE, **opts.hub_province)


def run(opts: Options, chaos: ChaosOptions, say: Callable[[str], None] = lambda line: None,
        live: bool = False) -> dict:
    """One chaos run; returns the summary of `sim run` plus the fault counters."""
    prepare(opts, chaos)
    return in_workdir(opts, lambda workdir: _chaos(opts, chaos, workdir, say, LiveView(live)))


async def _chaos(opts: Options, copts: ChaosOptions, workdir: str, say: Callable[[str], None],
                 live: LiveView) -> dict:
    rng = random.Random(opts.seed)
    session = Session(opts, workdir, say)
    runner = None
    try:
        await session.open()
        fleet, hall, province = session.fleet, session.hall, session.province
        if "province" in copts.kinds:
            await _check_fault_switch(session)
        plan = FaultPlan(opts.seed, copts.kinds, list(fleet.devices), copts.every_s)
        chaos = Chaos(session, plan, os.path.join(workdir, "faults.jsonl"))
        citizens = Citizens(fleet, session.hub_api, rng, opts.mix, resilient=True,
                            attempts=copts.attempts)
        citizens.on_decide = chaos.on_decide
        say("citizens arrive; faults every %.1f s on average: %s" % (
            copts.every_s, ", ".join(copts.kinds)))
        visits = session.windows_visits(opts.votes)
        serving = asyncio.gather(*(citizens.serve(d, hall.windows[d], n)
                                   for d, n in visits.items() if n))
        runner = asyncio.ensure_future(chaos.run())
        deadline = session.started + opts.deadline_s
        forgeries = Forgeries()

        def show(phase):
            progress = session.progress(citizens, phase, opts.votes)
            progress.faults = chaos.counts
            progress.faults_active = chaos.active
            live.show(progress)

        async def forge():
            nonlocal forgeries
            chaos.pause()
            try:
                # Started only while no broker or hub fault runs, and none starts meanwhile.
                while not chaos.calm():
                    await asyncio.sleep(0.2)
                forgeries = await session.forge(rng)
            finally:
                chaos.resume()

        async def forge_once():
            if opts.forged and not forgeries.sent and len(_victim(fleet)[1]) >= 2:
                await forge()

        await session.serve_out(serving, deadline, show, forge_once)
        show("healing")
        await chaos.finish(runner)
        runner = None
        if opts.forged and not forgeries.sent:
            await forge()
        await session.drain(deadline, show)
        pstats, hub_status = await session.gather_counters()
        live.end()
        session.write_visits(citizens.outcome.visits)
        summary = _summary(opts, fleet, citizens.outcome.visits, province, pstats, hub_status,
                           forgeries, time.monotonic() - session.started,
                           time.monotonic() <= deadline, hall)
        summary.update(_chaos_summary(chaos, citizens, session))
        summary["ok"] = bool(summary["ok"] and not summary["faults_missing"]
                             and not summary["fault_errors"])
        return summary
    finally:
        if runner is not None:
            runner.cancel()
        live.end()
        await session.close()


async def _check_fault_switch(session: Session) -> None:
    url = session.hall.province_url + "/_control/faults"
    try:
        async with session.http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status == 200:
                return
    except (aiohttp.ClientError, asyncio.TimeoutError):
        pass
    raise ChaosError("the province at %s has no fault switch (start it with --faults, or "
                     "leave province out of --faults)" % session.hall.province_url)


def _chaos_summary(chaos: Chaos, citizens: Citizens, session: Session) -> dict:
    visits = citizens.outcome.visits
    out = chaos.summary()
    out.update({
        "presses_lost_to_power_cut": sum(1 for v in visits if v.cut_after_press),
        "durable_unreported": sum(1 for d in session.fleet.devices.values()
                                  for s in d.saved.values() if not s.reported),
        "visits_disrupted": sum(1 for v in visits if v.disruptions),
        "visit_retries": sum(max(0, v.attempts - 1) for v in visits),
        "power_cuts": sum(d.power_cuts for d in session.fleet.devices.values()),
        "network": session.proxy.counters() if session.proxy is not None else {},
        "fault_seed": session.opts.seed,
    })
    out.setdefault("durable_unreported_at_province", sum(
        1 for d in session.fleet.devices.values() for s in d.saved.values()
        if not s.reported and "%s:%d" % (d.device_id, s.seq) in session.province.records))
    return out
