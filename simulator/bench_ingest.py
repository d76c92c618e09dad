"""Figure 1, hub durable ingest: votes per second from the broker into SQLite with acks.

The load: `devices` emulated evaluators (simulator/bench_load.py) in `workers` processes,
each device with `votes` signed votes (valid MACs) and at most `window` of them unacked at
a time, resending from the oldest unacked one if acks stop for 10 s, as the firmware does.

- Hub: the votes go to the real hub (`pingjia hub run`, supervising its mosquitto, with
  the reference province taking its batches meanwhile). The clock runs from "go" until
  every device holds the hub's ack for its last vote: each ack means committed in SQLite
  (WAL, synchronous=FULL). votes/s = votes / that time.
- Baseline: the same devices and votes against a twin of the hub's mosquitto (same
  configuration, see bench_kit.TwinBroker), where a vote only waits for the broker's
  PUBACK and one QoS 1 subscriber logged in as the hub user receives them. votes/s =
  votes received / time from "go" to the last one received.

Repeats alternate baseline and hub, so both see the same background load.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any, Callable

from simulator.bench_kit import (BenchError, CpuMeter, TwinBroker, Workers, device_spec,
                                 machine_busy, median, ratio, split)
from simulator.run import Hall, Options, free_port


async def _flood(specs: list[dict], plan: Any, mode: str, subscriber: dict | None,
                 cpu_pids: dict[str, list[int]]) -> dict:
    workers = Workers()
    try:
        jobs = [{"role": "devices", "mode": mode, "devices": part,
                 "flood": {"count": plan.votes_per_device, "window": plan.window},
                 "timeout_s": plan.timeout_s}
                for part in split(specs, plan.workers)]
        if subscriber is not None:
            jobs.insert(0, dict(subscriber, role="subscriber",
                                expect=plan.votes_per_device * len(specs)))
        await workers.start(jobs)
        if workers.connected() != len(specs):
            raise BenchError("only %d of %d emulated devices connected" % (
                workers.connected(), len(specs)))
        meter = CpuMeter(cpu_pids)
        await asyncio.sleep(0.5)  # births and greetings settle before the clock starts
        meter.start()
        await workers.go()
        done = await workers.results("devices", plan.timeout_s + 30)
        received = await workers.results("subscriber", plan.timeout_s + 30) \
            if subscriber is not None else []
        shares = meter.stop()
    finally:
        await workers.close()
    votes = sum(d["votes"] for d in done)
    go_ms = min(d["go_ms"] for d in done)
    if subscriber is not None:
        got = received[0]
        elapsed = (got["last_ms"] - go_ms) / 1000.0 if got["received"] else None
        count = got["received"]
        finished = got["received"] == votes
    else:
        elapsed = (max(d["end_ms"] for d in done) - go_ms) / 1000.0
        count = votes
        finished = all(d["finished"] for d in done)
    rate = count / elapsed if elapsed else None
    wall_s = (max(d["end_ms"] for d in done) - go_ms) / 1000.0
    # The load workers report their own CPU time (they are gone before the meter stops).
    shares["load"] = round(sum(w.get("cpu_s", 0) for w in done + received) / max(wall_s, 1e-3), 2)
    stats = {k: sum(d["stats"].get(k, 0) for d in done) for k in ("published", "resends",
                                                                 "disconnects")}
    return {"votes_per_s": round(rate, 1) if rate else None, "votes": votes, "delivered": count,
            "elapsed_s": round(elapsed, 3) if elapsed else None, "finished": finished,
            "cpu_cores": shares, "load_avg": machine_busy(), **stats}


async def measure(plan: Any, workdir: str, say: Callable[[str], None]) -> dict:
    """Run the figure `plan.repeat` times (baseline, then hub, each time); medians."""
    opts = Options(devices=plan.devices, forged=False,
                   hub_province={"batch_interval_ms": 300})
    hall = Hall(opts, workdir, say)
    loop = asyncio.get_running_loop()
    say("ingest: preparing a hall with %d devices" % plan.devices)
    await loop.run_in_executor(None, hall.prepare)
    twin = TwinBroker(hall.settings, hall.provisioned, os.path.join(workdir, "twin"), free_port())
    import aiohttp

    runs: list[dict] = []
    baselines: list[dict] = []
    try:
        hall.start_services()
        async with aiohttp.ClientSession() as http:
            await hall.wait_ready(http)
        await loop.run_in_executor(None, twin.start)
        hub_pids = {"hub": [hall.service("hub").proc.pid],
                    "broker": [hall.broker_pid() or 0],
                    "province": [hall.service("province").proc.pid]}
        next_seq = {d: 1 for d in hall.provisioned}
        for r in range(plan.repeat):
            say("ingest: run %d/%d, baseline (mosquitto alone)" % (r + 1, plan.repeat))
            specs = [device_spec(p, twin.host, twin.port) for p in hall.provisioned.values()]
            subscriber = {"client_id": "bench-subscriber", "user": hall.settings.broker.hub_user,
                          "password": hall.settings.broker.hub_password, "host": twin.host,
                          "port": twin.port}
            baselines.append(await _flood(specs, plan, "broker_flood", subscriber,
                                          {"broker": [twin.pid or 0]}))
            say("ingest: run %d/%d, hub" % (r + 1, plan.repeat))
            broker = hall.settings.broker
            specs = [device_spec(p, "127.0.0.1", broker.port, next_seq[d])
                     for d, p in hall.provisioned.items()]
            result = await _flood(specs, plan, "flood", None, hub_pids)
            for d in next_seq:
                next_seq[d] += plan.votes_per_device
            runs.append(result)
            if not result["finished"]:
                break
    finally:
        await loop.run_in_executor(None, twin.stop)
        await loop.run_in_executor(None, hall.stop)
    value = median([r["votes_per_s"] for r in runs if r["finished"]])
    baseline = median([b["votes_per_s"] for b in baselines])
    share = ratio(value, baseline)
    return {
        "what": "votes/s from the broker into SQLite with acks, at steady load (emulated devices)",
        "unit": "votes/s",
        "value": value,
        "baseline": baseline,
        "baseline_what": "mosquitto QoS 1 publish-to-subscribe rate, same devices and votes, "
                         "same broker configuration",
        "ratio": share,
        "target": "ratio >= 0.5",
        "met": share is not None and share >= 0.5,
        "devices": plan.devices,
        "votes_per_run": plan.devices * plan.votes_per_device,
        "window": plan.window,
        "runs": runs,
        "baseline_runs": baselines,
    }
