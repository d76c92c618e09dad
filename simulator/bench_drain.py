"""Figure 3, backlog drain: `votes` held during a province outage, then released.

1. A hall of `devices` windows is prepared and its hub store filled with `votes` signed
   votes through the hub's own Ingestor (the same checks and transactions as MQTT ingest,
   without the broker), pressed a visit apart at every window over the outage: the
   backlog the hub holds, stored and acked, when the province comes back.
2. The reference province starts with its fault switch set to answer 503, then the hub
   (`pingjia hub run`); the forwarder builds its first batch, fails, and backs off.
3. Release: the fault is switched off. The clock runs until the hub has marked every vote
   forwarded (the province answered that it holds it).

Baseline: the receiver's raw accept rate for pre-built batches: the very batches the hub
sent (their stored bodies, byte for byte), POSTed one after the other to a fresh receiver
with the forwarder's own HTTP client, records / time.

The hub's settings are its defaults except `province.retry_max_s` (2 s here, 60 s by
default): the first retry after the release can wait up to that cap, which says nothing
about draining, so the release-to-first-acceptance wait is reported apart.
"""
from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import time
import urllib.request
from typing import Any, Callable

from simulator.bench_kit import BenchError, CpuMeter, machine_busy, median, ratio
from simulator.run import Hall, Options, Service, free_port

RETRY_MAX_S = 2.0
GROUP = 500  # uplinks per fill transaction (the ingest default max_batch)
VISIT_S = 120
# hub_state cursors of the hub's background readers of new votes (hub/business.py suspicion
# and outcomes, hub/dashboard.py live feed and alerts).
CONSUMER_CURSORS = ("business_vote_rowid", "dashboard_vote_rowid")


def _province_service(workdir: str, name: str, port: int, trust_pem: str) -> Service:
    # As simulator/run.py starts its services: SIGTERM when the bench dies.
    code = ("import signal, sys; from simulator.fleet import die_with_parent; "
            "die_with_parent(signal.SIGTERM); from simulator.province_cli import serve as c; "
            "c.main(sys.argv[1:], prog_name='pingjia')")
    argv = [sys.executable, "-c", code, "--host", "127.0.0.1", "--port", str(port),
            "--db", os.path.join(workdir, name + ".db"), "--trust", trust_pem, "--faults"]
    return Service(name, argv, os.path.join(workdir, name + ".log"), workdir)


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError("nothing answers at %s" % url)


def _set_fault(base_url: str, spec: dict) -> None:
    request = urllib.request.Request(base_url + "/_control/faults", data=json.dumps(spec).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        resp.read()


def fill(settings: Any, provisioned: dict, total: int) -> dict:
    """Store `total` signed votes through the Ingestor; returns counts and the time taken."""
    from firmware.evaluator import codec
    from hub.ingest import Ingestor, Uplink
    from hub.store import Store

    devices = sorted(provisioned.values(), key=lambda p: p.device_id)
    per, extra = divmod(total, len(devices))
    now = int(time.time())
    store = Store(settings.db_path)
    ingestor = Ingestor(store)
    started = time.monotonic()
    stored = 0
    group: list = []
    try:
        for i, prov in enumerate(devices):
            key = bytes.fromhex(prov.key_hex)
            count = per + (1 if i < extra else 0)
            for seq in range(1, count + 1):
                stars = 5 - (seq % 3) if seq % 7 else 2
                reasons = ["S01"] if stars <= 2 else []
                vote = codec.make_vote(key, prov.device_id, seq, now - (count - seq) * VISIT_S,
                                       codec.KIND_VOTE, "O%d" % seq, "OUTAGE-%d" % seq, stars,
                                       reasons, "nat-2024.1" if reasons else "",
                                       prov.window or "", "10001")
                group.append(Uplink("pj/%s/up/vote" % prov.device_id, codec.encode_vote(vote),
                                    0, 1, 0))
                if len(group) >= GROUP:
                    stored += ingestor.handle_group(group).stored
                    group = []
        if group:
            stored += ingestor.handle_group(group).stored
        elapsed = time.monotonic() - started
        # During a real outage of hours the hub's business flow and dashboard monitor read
        # each vote as it came; here the whole backlog arrived at once, and they would
        # still be reading it (about 1,000 and 500 votes/s) while the drain is timed.
        last = store.conn.execute("SELECT coalesce(max(rowid), 0) FROM votes").fetchone()[0]
        with store.transaction():
            for cursor in CONSUMER_CURSORS:
                store.set_state(cursor, last)
    finally:
        store.close()
    if stored != total:
        raise BenchError("filled %d of %d votes" % (stored, total))
    return {"votes": stored, "fill_s": round(elapsed, 2),
            "fill_votes_per_s": round(stored / max(elapsed, 1e-6), 1)}


def _forwarded(db_path: str) -> tuple[int, int]:
    conn = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True, timeout=30)
    try:
        forwarded = conn.execute("SELECT count(*) FROM votes WHERE forwarded_at IS NOT NULL"
                                 ).fetchone()[0]
        attempts = conn.execute("SELECT coalesce(max(sent_attempts), 0) FROM batches"
                                ).fetchone()[0]
    finally:
        conn.close()
    return forwarded, attempts


def _batches(db_path: str) -> list[str]:
    conn = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True, timeout=30)
    try:
        return [row[0] for row in conn.execute("SELECT body FROM batches ORDER BY n")]
    finally:
        conn.close()


def replay(bodies: list[str], base_url: str, profile_name: str) -> dict:
    """POST pre-built batches in order with the forwarder's client; records per second."""
    from hub import batch as batchlib
    from hub.forward import http_post

    profile = batchlib.load_profile(profile_name)
    records = 0
    started = time.monotonic()
    for body in bodies:
        url, headers, data = batchlib.build_request(profile, base_url, body.encode("utf-8"), None)
        status, answer = http_post(url, data, 60.0, headers)
        if status != 200 or not isinstance(answer, dict):
            raise BenchError("the receiver refused a replayed batch: HTTP %d" % status)
        records += len(answer.get("accepted") or []) + len(answer.get("duplicate") or [])
    elapsed = time.monotonic() - started
    return {"records": records, "batches": len(bodies), "elapsed_s": round(elapsed, 2),
            "records_per_s": round(records / max(elapsed, 1e-6), 1)}


def _drain(hall: Hall, province_url: str, total: int, timeout_s: float) -> dict:
    """Release the province and time the hub until every vote is forwarded."""
    db = hall.settings.db_path
    deadline = time.monotonic() + 60
    while _forwarded(db)[1] < 1:
        if time.monotonic() > deadline:
            raise BenchError("the hub never tried the province during the outage")
        time.sleep(0.2)
    meter = CpuMeter({"hub": [hall.service("hub").proc.pid],
                      "province": [hall.service("bench-province").proc.pid]})
    meter.start()
    released = time.monotonic()
    _set_fault(province_url, {"mode": "ok"})
    first = None
    forwarded = 0
    end = released + timeout_s
    while time.monotonic() < end:
        forwarded = _forwarded(db)[0]
        if forwarded and first is None:
            first = time.monotonic()
        if forwarded >= total:
            break
        time.sleep(0.1)
    done = time.monotonic()
    shares = meter.stop()
    if forwarded < total:
        raise BenchError("only %d of %d votes forwarded %d s after the release"
                         % (forwarded, total, timeout_s))
    first = first or done
    return {"release_to_all_s": round(done - released, 2),
            "release_to_first_s": round(first - released, 2),
            "first_to_all_s": round(done - first, 2),
            "votes_per_s": round(total / max(done - first, 1e-3), 1),
            "cpu_cores": shares, "load_avg": machine_busy()}


async def measure(plan: Any, workdir: str, say: Callable[[str], None]) -> dict:
    loop = asyncio.get_running_loop()
    runs, baselines = [], []
    for r in range(plan.drain_repeat):
        run_dir = os.path.join(workdir, "run%d" % (r + 1))
        os.makedirs(run_dir, exist_ok=True)
        result, bodies, hall = await loop.run_in_executor(None, _one_run, plan, run_dir, say, r)
        runs.append(result)
        for b in range(plan.repeat if r == 0 else 0):
            say("drain: baseline %d/%d, the %d batches replayed to a fresh receiver"
                % (b + 1, plan.repeat, len(bodies)))
            baselines.append(await loop.run_in_executor(
                None, _baseline, bodies, hall, run_dir, "replay%d" % (b + 1)))
    value = median([r["release_to_all_s"] for r in runs])
    rate = median([r["votes_per_s"] for r in runs])
    raw = median([b["records_per_s"] for b in baselines])
    return {
        "what": "time from the province's return until the hub has every held vote accepted",
        "unit": "s",
        "votes": plan.drain_votes,
        "value": value,
        "drain_votes_per_s": rate,
        "baseline": raw,
        "baseline_what": "the receiver's raw accept rate for the same pre-built batches, "
                         "records/s",
        "ratio": ratio(rate, raw),
        "runs": runs,
        "baseline_runs": baselines,
        "retry_max_s": RETRY_MAX_S,
    }


def _one_run(plan: Any, workdir: str, say: Callable[[str], None], r: int):
    port = free_port()
    province_url = "http://127.0.0.1:%d" % port
    opts = Options(devices=plan.drain_devices, forged=False, province_url=province_url,
                   hub_province={"retry_max_s": RETRY_MAX_S})
    hall = Hall(opts, workdir, say)
    say("drain: preparing a hall with %d devices and %d held votes" % (plan.drain_devices,
                                                                      plan.drain_votes))
    hall.prepare()
    filled = fill(hall.settings, hall.provisioned, plan.drain_votes)
    province = _province_service(workdir, "bench-province", port, hall.public_pem)
    hall.services.append(province)
    try:
        _wait_http(province_url + "/healthz")
        _set_fault(province_url, {"mode": "error", "status": 503})
        hall.start_services()
        _wait_http(hall.http_url + "/healthz")
        say("drain: province down, hub holding %d votes; releasing" % plan.drain_votes)
        result = _drain(hall, province_url, plan.drain_votes, plan.drain_timeout_s)
        result.update(filled)
        bodies = _batches(hall.settings.db_path)
        result["batches"] = len(bodies)
    finally:
        hall.stop()
    return result, bodies, hall


def _baseline(bodies: list[str], hall: Hall, workdir: str, name: str) -> dict:
    port = free_port()
    service = _province_service(workdir, name, port, hall.public_pem)
    try:
        _wait_http("http://127.0.0.1:%d/healthz" % port)
        return replay(bodies, "http://127.0.0.1:%d/api/v1" % port,
                      hall.settings.province.profile)
    finally:
        service.stop()
