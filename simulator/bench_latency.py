"""Figure 2 (press-to-province latency) and figure 5 (how many devices one hub holds).

Latency is measured from the citizen's deciding key press (host clock) to the moment the
reference province stored the record (its `received_at_ms`, same host clock), at a busy
hall's peak pace: every window serves one citizen after another, about `period_s` apart.

- Real devices: the firmware under MicroPython, one process per device, driven by the
  simulator's citizens (simulator/run.py Session, simulator/citizens.py): prompt over the
  hub's HTTP API, the device shows it, the citizen thinks and presses.
- Emulated devices (simulator/bench_load.py): the same protocol and counter flow without
  the firmware, for sizes a 2-core machine cannot run as MicroPython processes.

Baseline: the broker hop, measured on the same broker during the same load: a QoS 1
message of a vote's size published by the hub's login to one device's downlink and
received by that device's login (bench_load "probe"). It is the one step of the path
that any design on the hall's MQTT broker takes; everything above it is this design's own
cost (journal sync on the device, the hub's SQLite commit, the forwarder's batching
interval, signing, the province's HTTPS leg). The hub's commit time is reported as part
of the breakdown instead (press -> stored at the hub).

The measurement runs `repeat` consecutive stretches of `stretch_s` seconds; p50 and p99
are the medians of the stretches' values, and `pooled` gives all samples together.

Figure 5 is a stepped search over emulated hall sizes with the same flow: a size holds
when every device stayed connected, every prompt was shown, every vote was acked and is at
the province exactly once; the latency target (p99 < 1 s) is judged separately.
"""
from __future__ import annotations

import asyncio
import datetime
import os
import random
import sqlite3
import time
from typing import Any, Callable

import aiohttp

from simulator.bench_kit import (BenchError, CpuMeter, Workers, device_spec, machine_busy,
                                 median, percentile, ratio, split)
from simulator.fleet import BOARD_HEAP
from simulator.run import Hall, Options, ProvinceView, STAFF_NAMES

PROBE_DEVICE = "BENCH-PROBE"
TARGET_P99_MS = 1000


def _iso_ms(text: str | None) -> int | None:
    if not text:
        return None
    moment = datetime.datetime.strptime(text.rstrip("Z"), "%Y-%m-%dT%H:%M:%S.%f")
    return int(moment.replace(tzinfo=datetime.timezone.utc).timestamp() * 1000)


def _hub_stored_ms(db_path: str) -> dict[str, int]:
    """voteId -> when the hub stored it (votes.received_at, set inside the commit)."""
    conn = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT device_id, seq, received_at FROM votes").fetchall()
    finally:
        conn.close()
    return {"%s:%d" % (d, s): _iso_ms(at) for d, s, at in rows}


async def _online(http: aiohttp.ClientSession, hub_url: str, want: int, timeout: float) -> int:
    """Wait until the hub counts `want` devices online (it has seen their births)."""
    deadline = time.monotonic() + timeout
    online = 0
    while time.monotonic() < deadline:
        try:
            async with http.get(hub_url + "/api/v1/status",
                                timeout=aiohttp.ClientTimeout(total=10)) as resp:
                online = (await resp.json())["devices"]["online"]
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError):
            online = 0
        if online >= want:
            return online
        await asyncio.sleep(0.5)
    return online


class Samples:
    """Latency samples (press -> province) with their press time, and the breakdown."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, press_ms: int, province_ms: int | None, durable_ms: int | None,
            stored_ms: int | None, acked_ms: int | None = None) -> None:
        self.rows.append({"press": press_ms, "province": province_ms, "durable": durable_ms,
                          "stored": stored_ms, "acked": acked_ms})

    def summary(self, start_ms: int, stretch_s: float, repeat: int, probe: list[int]) -> dict:
        arrived = [r for r in self.rows if r["province"] is not None]
        lat = [r["province"] - r["press"] for r in arrived]
        stretches = []
        for i in range(repeat):
            lo = start_ms + int(i * stretch_s * 1000)
            hi = lo + int(stretch_s * 1000)
            values = [r["province"] - r["press"] for r in arrived if lo <= r["press"] < hi]
            stretches.append({"n": len(values), "p50_ms": percentile(values, 50),
                              "p99_ms": percentile(values, 99)})
        p50 = median([s["p50_ms"] for s in stretches])
        p99 = median([s["p99_ms"] for s in stretches])
        base50, base99 = percentile(probe, 50), percentile(probe, 99)

        def part(key: str, base: str = "press") -> dict:
            values = [r[key] - r[base] for r in self.rows
                      if r[key] is not None and r[base] is not None]
            return {"p50_ms": percentile(values, 50), "p99_ms": percentile(values, 99)}

        return {
            "p50_ms": p50, "p99_ms": p99,
            "target": "p99 < %d ms" % TARGET_P99_MS,
            "met": p99 is not None and p99 < TARGET_P99_MS,
            "votes": len(self.rows), "at_province": len(arrived),
            "pooled": {"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
                       "max_ms": max(lat) if lat else None},
            "stretches": stretches,
            "baseline": {"what": "broker hop: QoS 1, vote-sized, hub login -> device login, "
                                 "same broker, same time", "p50_ms": base50, "p99_ms": base99,
                         "samples": len(probe)},
            "ratio_p50": ratio(p50, base50), "ratio_p99": ratio(p99, base99),
            "breakdown": {"press_to_durable": part("durable"), "press_to_hub_stored":
                          part("stored"), "press_to_device_ack": part("acked"),
                          "hub_stored_to_province": part("province", "stored")},
        }


async def _probe_start(hall: Hall, probe: Any) -> Workers:
    settings = hall.settings
    workers = Workers()
    await workers.start([{
        "role": "probe", "host": "127.0.0.1", "port": settings.broker.port,
        "client_id": "bench-probe-%d" % os.getpid(), "user": settings.broker.hub_user,
        "password": settings.broker.hub_password, "every_ms": 100,
        "device": {"d": probe.device_id, "password": probe.mqtt_password}}])
    await workers.go()
    return workers


async def _probe_stop(workers: Workers) -> list[int]:
    await workers.finish()
    done = await workers.results("probe", 30)
    await workers.close()
    return done[0]["delays_ms"] if done else []


def _add_probe(hall: Hall) -> Any:
    from hub.provision import add_device

    return add_device(hall.settings, PROBE_DEVICE, label="benchmark probe")


# ---- real devices (MicroPython) -------------------------------------------------------------

async def real_devices(n: int, plan: Any, workdir: str, say: Callable[[str], None]) -> dict:
    """p50/p99 with `n` firmware devices under MicroPython."""
    from simulator.citizens import Citizens, Mix
    from simulator.run import Session

    opts = Options(devices=n, votes=0, forged=False, seed=plan.seed, heap=BOARD_HEAP,
                   mix=Mix(bad=0.15, walk_away=0.0, misuse=0.0))
    session = Session(opts, workdir, say)
    say("latency: booting %d real devices" % n)
    started = time.monotonic()
    try:
        await session.open()
        boot_s = time.monotonic() - started
        hall, fleet = session.hall, session.fleet
        online = await _online(session.http, hall.http_url, n, 60 + n)
        if online < n:
            raise BenchError("only %d of %d devices are online at the hub" % (online, n))
        probe = await asyncio.get_running_loop().run_in_executor(None, _add_probe, hall)
        probing = await _probe_start(hall, probe)
        rng = random.Random(plan.seed)
        citizens = Citizens(fleet, session.hub_api, rng, opts.mix)
        period = plan.period_s if n > 1 else plan.single_period_s
        total_s = plan.stretch_s * plan.repeat
        pause = (period * 0.5, period * 1.5)
        visits = max(1, int(round(total_s / (period + 2.0))))
        meter = CpuMeter({"devices": [d.proc.pid for d in fleet.devices.values() if d.proc],
                          "hub": [hall.service("hub").proc.pid],
                          "broker": [hall.broker_pid() or 0],
                          "province": [hall.service("province").proc.pid]})

        async def window(device_id: str) -> None:
            if n > 1:
                await asyncio.sleep(rng.uniform(0, period))
            await citizens.serve(device_id, hall.windows[device_id], visits, pause)

        say("latency: %d real devices, %d visits each, one about every %.0f s" % (
            n, visits, period + 2.0))
        start_ms = int(time.time() * 1000)
        meter.start()
        await asyncio.gather(*(window(d) for d in sorted(fleet.devices)))
        shares = meter.stop()
        probe_ms = await _probe_stop(probing)
        await session.drain(time.monotonic() + 60, lambda phase: None)
        await session.gather_counters()
        stored = await asyncio.get_running_loop().run_in_executor(
            None, _hub_stored_ms, hall.settings.db_path)
        samples = Samples()
        errors = 0
        for visit in citizens.outcome.visits:
            if visit.error:
                errors += 1
            if not (visit.seq and visit.pressed_ms and visit.kind == "v"):
                continue
            vote_id = "%s:%d" % (visit.device_id, visit.seq)
            record = session.province.records.get(vote_id)
            saved = fleet.devices[visit.device_id].saved.get(visit.seq)
            samples.add(visit.pressed_ms, int(record["received_at_ms"]) if record else None,
                        saved.at_ms if saved else None, stored.get(vote_id))
        span = (max(v.ended_ms for v in citizens.outcome.visits) - start_ms) / 1000.0 \
            if citizens.outcome.visits else total_s
        out = samples.summary(start_ms, max(span, 1.0) / plan.repeat, plan.repeat, probe_ms)
        examples = sorted({v.error[:160] for v in citizens.outcome.visits if v.error})[:5]
        out.update({
            "devices": n, "kind": "real firmware (MicroPython unix port, -X heapsize=%s)"
            % opts.heap, "visits": len(citizens.outcome.visits), "visit_errors": errors,
            "visit_error_examples": examples, "boot_s": round(boot_s, 1),
            "votes_per_s": round(len(samples.rows) / max(span, 1.0), 2),
            "heap_peak_bytes": max((d.heap_live_max for d in fleet.devices.values()), default=0),
            "heap_bytes": max((d.heap_size for d in fleet.devices.values()), default=0),
            "device_crashes": len(fleet.crashed()), "cpu_cores": shares,
            "load_avg": machine_busy()})
        # A run where citizens could not vote measured too little to judge the target.
        out["valid"] = errors == 0 and not out["device_crashes"]
        out["met"] = out["met"] and out["valid"]
        return out
    finally:
        await session.close()


# ---- emulated devices -------------------------------------------------------------------------

async def _sign_in_all(http: aiohttp.ClientSession, hub_url: str, windows: list[str]) -> None:
    gate = asyncio.Semaphore(8)

    async def one(i: int, window: str) -> None:
        async with gate:
            async with http.post(hub_url + "/api/v1/windows/%s/staff" % window,
                                 json={"staff_no": "1%04d" % (i + 1),
                                       "name": STAFF_NAMES[i % len(STAFF_NAMES)]},
                                 timeout=aiohttp.ClientTimeout(total=60)) as resp:
                if resp.status != 200:
                    raise BenchError("sign-in at %s: HTTP %d" % (window, resp.status))

    await asyncio.gather(*(one(i, w) for i, w in enumerate(windows)))


async def emulated_devices(n: int, plan: Any, workdir: str, say: Callable[[str], None],
                           stretch_s: float | None = None, repeat: int | None = None) -> dict:
    """p50/p99 and the guarantees with `n` emulated devices (see the module docstring)."""
    repeat = repeat or plan.repeat
    stretch_s = stretch_s or plan.stretch_s
    opts = Options(devices=n, forged=False)
    hall = Hall(opts, workdir, say)
    loop = asyncio.get_running_loop()
    say("latency: preparing a hall with %d emulated devices" % n)
    prepared = time.monotonic()
    await loop.run_in_executor(None, hall.prepare)
    probe = await loop.run_in_executor(None, _add_probe, hall)
    prepare_s = time.monotonic() - prepared
    workers = Workers()
    probing = None
    try:
        hall.start_services()
        async with aiohttp.ClientSession() as http:
            await hall.wait_ready(http)
            await _sign_in_all(http, hall.http_url, [hall.windows[d] for d in sorted(hall.windows)])
            broker = hall.settings.broker
            specs = [device_spec(p, "127.0.0.1", broker.port)
                     for _, p in sorted(hall.provisioned.items())]
            period = plan.period_s
            jobs = [{"role": "devices", "mode": "visits", "devices": part, "seed": plan.seed,
                     "connect_timeout_s": 60 + n / 10,
                     "visits": {"http": hall.http_url, "pace_s": [period * 0.5, period * 1.5],
                                "think_s": [0.3, 1.5],
                                "journal_dir": os.path.join(workdir, "journals")}}
                    for part in split(specs, plan.workers if n > 50 else 1)]
            connected_at = time.monotonic()
            await workers.start(jobs)
            online = await _online(http, hall.http_url, n, 60 + n / 5)
            connect_s = time.monotonic() - connected_at
            if workers.connected() < n or online < n:
                raise BenchError("%d of %d emulated devices connected, %d online at the hub"
                                 % (workers.connected(), n, online))
            probing = await _probe_start(hall, probe)
            meter = CpuMeter({"hub": [hall.service("hub").proc.pid],
                              "broker": [hall.broker_pid() or 0],
                              "province": [hall.service("province").proc.pid]})
            say("latency: %d emulated devices, one citizen per window about every %.0f s, "
                "for %.0f s" % (n, period, stretch_s * repeat))
            start_ms = int(time.time() * 1000)
            meter.start()
            await workers.go()
            await asyncio.sleep(stretch_s * repeat)
            await workers.finish(("devices",))
            done = await workers.results("devices", 180)
            shares = meter.stop()
            probe_ms = await _probe_stop(probing)
            probing = None
            wall_s = max((d["end_ms"] - d["go_ms"]) / 1000.0 for d in done)
            shares["load"] = round(sum(d.get("cpu_s", 0) for d in done) / max(wall_s, 1e-3), 2)
            votes = [v for d in done for v in d["votes"]]
            province = ProvinceView(http, hall.province_url)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                await province.poll()
                if all("%s:%d" % (v[0], v[1]) in province.records for v in votes):
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)
            await province.poll()
            async with http.get(hall.province_url + "/api/v1/stats") as resp:
                pstats = await resp.json()
        await workers.close()
        stored = await loop.run_in_executor(None, _hub_stored_ms, hall.settings.db_path)
    finally:
        if probing is not None:
            await probing.close()
        await workers.close()
        await loop.run_in_executor(None, hall.stop)
    samples = Samples()
    for device_id, seq, press_ms, durable_ms, acked_ms in votes:
        vote_id = "%s:%d" % (device_id, seq)
        record = province.records.get(vote_id)
        samples.add(press_ms, int(record["received_at_ms"]) if record else None, durable_ms,
                    stored.get(vote_id), acked_ms)
    out = samples.summary(start_ms, stretch_s, repeat, probe_ms)
    stats = {k: sum(d["stats"].get(k, 0) for d in done) for k in
             ("prompt_errors", "disconnects", "resends", "refused", "journal_refused")}
    stats["prompt_error_examples"] = sorted({e for d in done for e in
                                             d["stats"].get("prompt_error_examples", [])})[:5]
    ours = {v[0] for v in votes} | set(hall.provisioned)
    strangers = [k for k in province.records if k.rsplit(":", 1)[0] in ours and
                 k not in stored]
    lost = sum(1 for v in votes if "%s:%d" % (v[0], v[1]) not in province.records)
    unacked = sum(d.get("unacked", 0) for d in done)
    duplicates = int(pstats.get("duplicates", 0)) + province.repeats
    out.update({
        "devices": n, "kind": "emulated (paho-mqtt, firmware codec and journal; no firmware)",
        "votes_per_s": round(len(votes) / max(stretch_s * repeat, 1.0), 2),
        "prepare_s": round(prepare_s, 1), "connect_s": round(connect_s, 1),
        "lost": lost, "unacked": unacked, "duplicates_at_province": duplicates,
        "unknown_at_province": len(strangers), "cpu_cores": shares, "load_avg": machine_busy(),
        **stats})
    out["valid"] = out["guarantees_kept"] = bool(
        votes and lost == 0 and unacked == 0 and duplicates == 0 and not strangers
        and stats["disconnects"] == 0 and stats["prompt_errors"] == 0
        and stats["journal_refused"] == 0)
    out["met"] = out["met"] and out["valid"]
    return out


# ---- figure 2 and figure 5 ------------------------------------------------------------------

async def measure(plan: Any, workdir: str, say: Callable[[str], None]) -> dict:
    sizes: dict[str, dict] = {}
    for n in plan.real_sizes:
        sizes["real_%d" % n] = await real_devices(n, plan, os.path.join(workdir, "real%d" % n),
                                                  say)
    for n in plan.emulated_sizes:
        sizes["emulated_%d" % n] = await emulated_devices(
            n, plan, os.path.join(workdir, "emulated%d" % n), say)
    return {
        "what": "press-to-province latency at a busy hall's peak pace (one citizen per window "
                "about every %.0f s; the single device back to back)" % plan.period_s,
        "unit": "ms",
        "target": "p99 < %d ms" % TARGET_P99_MS,
        "sizes": sizes,
        "met": all(s["met"] for s in sizes.values()) if sizes else False,
    }


async def scale(plan: Any, workdir: str, say: Callable[[str], None],
                known: dict[str, dict] | None = None) -> dict:
    """Figure 5: the largest emulated hall that keeps every guarantee (stepped search)."""
    steps: list[dict] = []
    for name, result in sorted((known or {}).items(), key=lambda kv: kv[1].get("devices", 0)):
        if name.startswith("emulated_") and "guarantees_kept" in result:
            steps.append(_step(result))
    held = [s["devices"] for s in steps if s["guarantees_kept"]]
    for n in plan.scale_steps:
        if any(s["devices"] == n for s in steps):
            continue
        if steps and not steps[-1]["guarantees_kept"] and steps[-1]["devices"] < n:
            break  # past the limit already
        try:
            result = await emulated_devices(n, plan, os.path.join(workdir, "scale%d" % n), say,
                                            stretch_s=plan.scale_stretch_s, repeat=1)
            steps.append(_step(result))
        except BenchError as exc:
            steps.append({"devices": n, "guarantees_kept": False, "latency_met": False,
                          "failure": str(exc)})
        if steps[-1]["guarantees_kept"]:
            held.append(n)
        else:
            break
    steps.sort(key=lambda s: s["devices"])
    latency_ok = [s["devices"] for s in steps if s.get("latency_met") and s["guarantees_kept"]]
    largest = max(held) if held else None
    return {
        "what": "the largest number of emulated devices one hub holds with every guarantee "
                "kept, at the peak pace (one citizen per window about every %.0f s)"
                % plan.period_s,
        "unit": "devices",
        "value": largest,
        "largest_with_p99_under_1s": max(latency_ok) if latency_ok else None,
        "steps": steps,
        "limited_by": _limit(steps),
        "baseline": 200,
        "baseline_what": "a busy hall's windows (up to 200)",
        "ratio": ratio(largest, 200),
        "searched_up_to": max((s["devices"] for s in steps), default=None),
    }


def _step(result: dict) -> dict:
    return {"devices": result["devices"], "guarantees_kept": result["guarantees_kept"],
            "latency_met": result["met"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
            "votes": result["votes"], "votes_per_s": result["votes_per_s"],
            "lost": result["lost"], "duplicates_at_province": result["duplicates_at_province"],
            "prompt_errors": result["prompt_errors"], "disconnects": result["disconnects"],
            "prompt_error_examples": result["prompt_error_examples"],
            "connect_s": result["connect_s"], "cpu_cores": result["cpu_cores"]}


def _limit(steps: list[dict]) -> str:
    """A plain statement of what stopped the search, from the last step's numbers."""
    if not steps:
        return "not measured"
    last = steps[-1]
    if last.get("failure"):
        return "set-up failed at %d devices: %s" % (last["devices"], last["failure"])
    busiest = max(last.get("cpu_cores", {}).items(), key=lambda kv: kv[1], default=("", 0))
    how = "busiest process at the largest step: %s at %.2f cores of %d" % (
        busiest[0], busiest[1], os.cpu_count() or 0)
    if not last["guarantees_kept"]:
        return "guarantees broke at %d devices (%s); %s" % (
            last["devices"], ", ".join("%s %s" % (k, last[k]) for k in
                                       ("lost", "prompt_errors", "disconnects")
                                       if last.get(k)), how)
    if not last["latency_met"]:
        return "p99 %s ms at %d devices is over 1 s; %s" % (last["p99_ms"], last["devices"], how)
    return "not reached: the largest step tried held; %s" % how
