"""Benchmark load: counter evaluators emulated over paho-mqtt, many per worker process.

A real simulated device is one MicroPython process (about 0.7 % of a core while idle and
25 MB of memory), so a 2-core machine cannot run hundreds of them, nor press votes faster
than a person. The benchmarks that need many devices or a flood of votes use these
emulated devices instead, and every figure measured with them is labelled "emulated".

An emulated device speaks the device protocol (docs/protocol.md) the way firmware/app.py
does: client id = username = device id, clean_session=0, a last will, `birth` with `lo`
and `next` on every connect, heartbeats every 30 s, votes signed with its own key by the
firmware's codec, QoS 1, and resent from the oldest unacked record when acks stop
advancing for 10 s. In `visits` mode each vote is first appended to a journal (the
firmware's Journal, synced to the host kernel as the simulated board does) and a prompt is
answered with `evt shown` before the "citizen" presses. What it lacks is everything a
person sees: no rating state machine, no screen, no keys.

A worker is `python -m simulator.bench_load`: it reads one JSON job line on stdin, prints
JSON event lines on stdout ("ready", then "done" with its measurements) and takes the
commands "go", "finish" and "quit" on stdin. Roles:

- `devices`: emulated devices in mode `flood` (publish precomputed votes as fast as the
  hub acks them, at most `window` unacked per device), `broker_flood` (the same votes, but
  each publish only waits for the broker's PUBACK: the baseline) or `visits` (the counter
  flow at a given pace: prompt over the hub's HTTP API, think, press, journal, publish).
- `subscriber`: the baseline's receiving end, logged in as the hub user on `pj/+/up/#`.
- `probe`: the broker hop: the hub user publishes a vote-sized QoS 1 message to a device's
  downlink every `every_ms`; that device's login receives it; the delay is recorded.

Everything runs on one asyncio loop per worker, paho clients driven through paho's
external-loop API (socket callbacks + loop_read/loop_write/loop_misc), so one process
holds thousands of connections without a thread each.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import sys
import time
from typing import Any, Callable

import paho.mqtt.client as paho

from firmware.evaluator import codec
from firmware.evaluator.journal import Journal, JournalError

RESEND_S = 10.0  # the firmware's resend_ms: no ack progress this long -> resend from oldest
HEARTBEAT_S = 30.0
MISC_EVERY_S = 1.0  # paho keepalive and retry bookkeeping for every client
RECONNECT_S = 1.0
PUBLISH_INFLIGHT = 20  # paho's default max_inflight_messages (the firmware sends one at a time)
FAST_TASKS = ("11440000MB2C94230X", "44000012345", "居民身份证换领")
BAD_SHARE = 0.15
LINE_LIMIT = 64 * 1024 * 1024
VISIT_S = 120  # seconds between two citizens at one window in a flood's backlog


def wall_ms() -> int:
    return int(time.time() * 1000)


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class PahoLoop:
    """Drives many paho clients from one asyncio loop (paho's external-loop API)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.clients: list[paho.Client] = []

    def attach(self, client: paho.Client) -> paho.Client:
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._wrote
        self.clients.append(client)
        return client

    def _opened(self, client, userdata, sock):
        self.loop.add_reader(sock, client.loop_read)

    def _closed(self, client, userdata, sock):
        self.loop.remove_reader(sock)
        self.loop.remove_writer(sock)

    def _want_write(self, client, userdata, sock):
        self.loop.add_writer(sock, client.loop_write)

    def _wrote(self, client, userdata, sock):
        self.loop.remove_writer(sock)

    async def misc(self) -> None:
        while True:
            for client in self.clients:
                client.loop_misc()
            await asyncio.sleep(MISC_EVERY_S)


def _client(client_id: str, user: str, password: str, clean: bool = False) -> paho.Client:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=clean)
    client.username_pw_set(user, password)
    client.max_inflight_messages_set(PUBLISH_INFLIGHT)
    client.max_queued_messages_set(0)
    return client


def _connect(client: paho.Client, host: str, port: int) -> None:
    client.connect(host, port, keepalive=30)
    sock = client.socket()
    if sock is not None:
        # Small writes, sent at once: the firmware's client does not batch either.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ---- one emulated evaluator ---------------------------------------------------------------

class Emulated:
    """One emulated evaluator (see the module docstring for what it does and does not do)."""

    def __init__(self, spec: dict, job: dict, paho_loop: PahoLoop, stats: dict):
        self.device_id = spec["d"]
        self.key = bytes.fromhex(spec["key"])
        self.window = spec.get("window") or ""
        self.job = job
        self.mode = job["mode"]
        self.stats = stats
        self.loop = paho_loop.loop
        self.up = "pj/%s/up/" % self.device_id
        self.dn = "pj/%s/dn/" % self.device_id
        self.connected = asyncio.Event()
        self.staff_no = ""
        self.cat_ver = ""
        self.reasons: list[str] = []
        self.progress = time.monotonic()
        self.acked = 0
        self.sent = 0  # highest sequence published in this pass
        # flood modes: precomputed payloads, first..last
        self.first = int(spec.get("next", 1))
        self.payloads: list[bytes] = []
        self._pubacked = 0
        self._vote_mids: set[int] = set()
        self.done = asyncio.Event()
        # visits mode: the journal and what happened to each vote
        self.journal: Journal | None = None
        self.votes: dict[int, list] = {}  # seq -> [press_ms, durable_ms, acked_ms, pid]
        self.prompt_waiters: dict[str, asyncio.Future] = {}
        self.rng = random.Random("%s:%s" % (job.get("seed", 0), self.device_id))
        if self.mode == "visits":
            os.makedirs(job["visits"]["journal_dir"], exist_ok=True)
            path = os.path.join(job["visits"]["journal_dir"], self.device_id)
            self.journal = Journal(path, 16, 4096, sync=lambda f: f.flush(),
                                   seq_floor=self.first)
        client = _client(self.device_id, spec.get("user") or self.device_id, spec["password"])
        client.will_set(self.up + "will", json.dumps({"v": 1, "d": self.device_id,
                                                      "online": False}), qos=1)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        if self.mode == "broker_flood":
            client.on_publish = self._on_puback
        self.client = paho_loop.attach(client)
        self._host, self._port = spec["host"], int(spec["port"])

    # -- connection -----------------------------------------------------------------------
    def connect(self) -> None:
        _connect(self.client, self._host, self._port)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.stats["refused"] += 1
            return
        client.subscribe(self.dn + "#", qos=1)
        nxt = self.next_seq()
        lo = self.oldest_unacked() or nxt
        client.publish(self.up + "birth", self.heartbeat(lo, nxt), qos=1)
        self.sent = max(self.acked, self.first - 1) if self.mode != "visits" else 0
        self.progress = time.monotonic()
        self.connected.set()
        self.pump()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if self.connected.is_set():
            self.stats["disconnects"] += 1
        self.connected.clear()
        if not self.job.get("quitting"):
            self.loop.call_later(RECONNECT_S, self._reconnect)

    def _reconnect(self) -> None:
        if self.job.get("quitting") or self.connected.is_set():
            return
        try:
            self.client.reconnect()
        except OSError:
            self.loop.call_later(RECONNECT_S, self._reconnect)

    def heartbeat(self, lo: int | None = None, nxt: int | None = None) -> bytes:
        hb = {"v": codec.PROTO, "d": self.device_id, "fw": "bench-emulated", "board": "emulated",
              "up": 0, "rst": "power", "heap": None, "jd": self.depth(), "old": 0, "rc": 0,
              "rssi": None, "stuck": [], "disp": 0, "mis": 0, "clk": 0}
        if lo is not None:
            hb["lo"], hb["next"] = lo, nxt
        return json.dumps(hb).encode()

    # -- sequence bookkeeping shared by the modes -------------------------------------------
    def next_seq(self) -> int:
        if self.journal is not None:
            return self.journal.next_seq
        return self.first + len(self.payloads)

    def oldest_unacked(self) -> int | None:
        if self.journal is not None:
            return self.journal.oldest_seq
        low = max(self.acked + 1, self.first)
        return low if low < self.first + len(self.payloads) else None

    def depth(self) -> int:
        if self.journal is not None:
            return self.journal.depth
        return max(0, self.first + len(self.payloads) - 1 - max(self.acked, self.first - 1))

    # -- downlinks --------------------------------------------------------------------------
    def _on_message(self, client, userdata, message):
        kind = message.topic[len(self.dn):]
        try:
            if kind == "ack":
                self._ack(codec.decode_ack(message.payload))
            elif kind == "prompt":
                self._prompt(json.loads(message.payload))
            elif kind == "ctx":
                ctx = json.loads(message.payload)
                self.staff_no = ctx.get("sn") or ""
            elif kind == "cat":
                cat = json.loads(message.payload)
                self.cat_ver = cat.get("cv") or ""
                self.reasons = [r["c"] for r in cat.get("rs", []) if isinstance(r, dict)]
        except (ValueError, KeyError, TypeError, AttributeError):
            self.stats["bad_downlinks"] += 1

    def _ack(self, seq: int) -> None:
        if seq <= self.acked:
            return
        now = wall_ms()
        if self.journal is not None:
            self.journal.ack(seq)
            for s in range(self.acked + 1, seq + 1):
                entry = self.votes.get(s)
                if entry is not None and entry[2] is None:
                    entry[2] = now
        self.acked = seq
        self.progress = time.monotonic()
        if self.mode == "flood" and self.acked >= self.first + len(self.payloads) - 1:
            self.done.set()
        self.pump()

    def _on_puback(self, client, userdata, mid, reason_code, properties):
        if mid not in self._vote_mids:
            return  # the birth's, say
        self._vote_mids.discard(mid)
        self.stats["pubacks"] += 1
        self._pubacked += 1
        if self._pubacked >= len(self.payloads):
            self.done.set()
        self.pump()

    # -- uplink -----------------------------------------------------------------------------
    def pump(self) -> None:
        """Publish what may go now: flood keeps `window` unacked; visits sends the journal."""
        if not self.connected.is_set():
            return
        if self.mode in ("flood", "broker_flood"):
            if not self.payloads or not self.job.get("going"):
                return
            last = self.first + len(self.payloads) - 1
            floor = self.acked if self.mode == "flood" else self.first - 1 + self._pubacked
            low = max(floor, self.first - 1)
            limit = min(last, low + self.job["flood"]["window"])
            while self.sent < limit:
                self.sent += 1
                if self.sent == low + 1:
                    self.progress = time.monotonic()  # the oldest unacked just went
                info = self.client.publish(self.up + "vote", self.payloads[self.sent - self.first],
                                           qos=1)
                self._vote_mids.add(info.mid)
                self.stats["published"] += 1
            return
        assert self.journal is not None
        oldest = self.journal.oldest_seq
        for seq, t, payload in self.journal.unacked(self.sent):
            self.client.publish(self.up + "vote", bytes(payload), qos=1)
            self.stats["published"] += 1
            if seq == oldest:
                # As the firmware: the oldest unacked record just went, its ack is due
                # from now (not from the last ack, which may be long ago).
                self.progress = time.monotonic()
            self.sent = seq

    def check_resend(self) -> None:
        """The firmware's rule: sent but no ack progress for RESEND_S -> from the oldest."""
        if self.mode == "broker_flood" or not self.connected.is_set():
            return
        if self.depth() and self.sent >= (self.oldest_unacked() or 0) and \
                time.monotonic() - self.progress >= RESEND_S:
            self.stats["resends"] += 1
            self.sent = max(self.acked, self.first - 1) if self.mode == "flood" else 0
            self.progress = time.monotonic()
            self.pump()

    def prepare_flood(self, count: int) -> None:
        """Sign `count` votes from the next sequence on, before the clock starts.

        They are a backlog as a device holds it after a network outage (the realistic way a
        hall floods its hub): pressed a visit apart (VISIT_S), the newest just now. Pressed
        all in the same second they would be what the hub flags as a burst at one window,
        and flagging a burst looks at every vote in it."""
        now = int(time.time())
        self._pubacked = 0
        for i in range(count):
            seq = self.first + i
            stars = 5 - (seq % 3)
            t = now - (count - i) * VISIT_S
            self.payloads.append(codec.encode_vote(codec.make_vote(
                self.key, self.device_id, seq, t, codec.KIND_VOTE, "B%d" % seq,
                "BENCH-%s-%d" % (self.device_id, seq), stars, [], "", self.window, "")))

    # -- the counter flow (visits mode) --------------------------------------------------
    def _prompt(self, prompt: dict) -> None:
        pid = prompt.get("pid")
        if not isinstance(pid, str) or not pid:
            self.client.publish(self.up + "evt", json.dumps({"pid": "", "st": "bad"}), qos=1)
            return
        self.client.publish(self.up + "evt", json.dumps({"pid": pid, "st": "shown"}), qos=1)
        think = self.job["visits"]["think_s"]
        self.loop.call_later(self.rng.uniform(*think), self.press, prompt)

    def press(self, prompt: dict) -> None:
        """The citizen's deciding press: sign, journal (durable), then publish."""
        press_ms = wall_ms()
        bad = self.reasons and self.rng.random() < BAD_SHARE
        stars = self.rng.choice((1, 2)) if bad else self.rng.choice((3, 4, 5, 5, 5))
        reasons = [self.rng.choice(self.reasons)] if bad else []
        assert self.journal is not None
        seq = self.journal.next_seq
        t = int(time.time())
        payload = codec.encode_vote(codec.make_vote(
            self.key, self.device_id, seq, t, codec.KIND_VOTE, prompt["pid"],
            prompt.get("case") or "", stars, reasons, self.cat_ver if bad else "", self.window,
            self.staff_no))
        try:
            self.journal.append(seq, t, payload)
        except (JournalError, OSError):
            self.stats["journal_refused"] += 1
            return
        self.votes[seq] = [press_ms, wall_ms(), None, prompt["pid"]]
        waiter = self.prompt_waiters.pop(prompt["pid"], None)
        if waiter is not None and not waiter.done():
            waiter.set_result(seq)
        self.pump()

    def _prompt_failed(self, why: str) -> None:
        self.stats["prompt_errors"] += 1
        examples = self.stats.setdefault("prompt_error_examples", [])
        if len(examples) < 5 and why not in examples:
            examples.append(why)

    async def serve(self, http, base_url: str, pace: tuple[float, float],
                    running: Callable[[], bool]) -> None:
        """One window's citizens, one after the other, `pace` seconds apart."""
        await asyncio.sleep(self.rng.uniform(0, pace[1]))
        n = 0
        while running():
            n += 1
            case = "BENCH-%s-%d-%d" % (self.window, os.getpid(), n)
            body = {"window": self.window, "case_no": case, "dept_code": FAST_TASKS[0],
                    "task_code": FAST_TASKS[1], "task_name": FAST_TASKS[2], "kind": "ji", "n": 1}
            try:
                async with http.post(base_url + "/api/v1/prompts", json=body) as resp:
                    answer = await resp.json(content_type=None)
                    if resp.status != 201:
                        self._prompt_failed("HTTP %d %s" % (
                            resp.status, str(answer.get("error") if isinstance(answer, dict)
                                             else answer)[:160]))
                        await asyncio.sleep(self.rng.uniform(*pace))
                        continue
                pid = answer["pid"]
                fut = self.loop.create_future()
                self.prompt_waiters[pid] = fut
                if not any(v[3] == pid for v in self.votes.values()):
                    await asyncio.wait_for(fut, 30)
            except (OSError, ValueError, KeyError, asyncio.TimeoutError) as exc:
                self._prompt_failed(exc.__class__.__name__)
            await asyncio.sleep(self.rng.uniform(*pace))


# ---- the worker roles ------------------------------------------------------------------------

async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)  # a job for thousands of devices is long
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _read_commands(reader: asyncio.StreamReader, queue: asyncio.Queue) -> None:
    while True:
        line = await reader.readline()
        if not line:
            await queue.put({"cmd": "quit"})
            return
        try:
            await queue.put(json.loads(line))
        except ValueError:
            continue


async def _wait_cmd(queue: asyncio.Queue, *names: str) -> dict:
    while True:
        cmd = await queue.get()
        if cmd.get("cmd") in names or cmd.get("cmd") == "quit":
            return cmd


def _new_stats() -> dict:
    return {k: 0 for k in ("published", "pubacks", "resends", "disconnects", "refused",
                           "bad_downlinks", "prompt_errors", "journal_refused")}


async def _devices(job: dict, commands: asyncio.Queue) -> None:
    loop = asyncio.get_running_loop()
    driver = PahoLoop(loop)
    stats = _new_stats()
    devices = [Emulated(spec, job, driver, stats) for spec in job["devices"]]
    misc = loop.create_task(driver.misc())
    if job["mode"] in ("flood", "broker_flood"):
        for dev in devices:
            dev.prepare_flood(job["flood"]["count"])
    for i, dev in enumerate(devices):
        dev.connect()
        if i % 50 == 49:
            await asyncio.sleep(0)  # let CONNACKs in while the rest connect
    connect_s = job.get("connect_timeout_s", 120)
    try:
        await asyncio.wait_for(asyncio.gather(*(d.connected.wait() for d in devices)), connect_s)
    except asyncio.TimeoutError:
        pass
    _emit({"ev": "ready", "connected": sum(1 for d in devices if d.connected.is_set()),
           "devices": len(devices)})
    housekeeping = loop.create_task(_housekeeping(devices))
    cmd = await _wait_cmd(commands, "go")
    if cmd.get("cmd") == "go":
        if job["mode"] == "visits":
            await _run_visits(job, devices, commands)
        else:
            await _run_flood(job, devices, stats)
    job["quitting"] = True
    housekeeping.cancel()
    misc.cancel()
    for dev in devices:
        dev.client.disconnect()
    await asyncio.sleep(0.2)


async def _housekeeping(devices: list[Emulated]) -> None:
    last_hb = time.monotonic()
    while True:
        await asyncio.sleep(1.0)
        for dev in devices:
            dev.check_resend()
        if time.monotonic() - last_hb >= HEARTBEAT_S:
            last_hb = time.monotonic()
            for dev in devices:
                if dev.connected.is_set():
                    dev.client.publish(dev.up + "hb", dev.heartbeat(), qos=0)


async def _run_flood(job: dict, devices: list[Emulated], stats: dict) -> None:
    go_ms = wall_ms()
    cpu0 = time.process_time()
    job["going"] = True
    for dev in devices:
        dev.pump()
    timeout = job.get("timeout_s", 300)
    try:
        await asyncio.wait_for(asyncio.gather(*(d.done.wait() for d in devices)), timeout)
        finished = True
    except asyncio.TimeoutError:
        finished = False
    _emit({"ev": "done", "go_ms": go_ms, "end_ms": wall_ms(), "finished": finished,
           "votes": sum(len(d.payloads) for d in devices),
           "complete_devices": sum(1 for d in devices if d.done.is_set()), "stats": stats,
           "cpu_s": round(time.process_time() - cpu0, 3)})


async def _run_visits(job: dict, devices: list[Emulated], commands: asyncio.Queue) -> None:
    import aiohttp

    visits = job["visits"]
    state = {"running": True}
    connector = aiohttp.TCPConnector(limit=visits.get("http_connections", 64))
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        go_ms = wall_ms()
        cpu0 = time.process_time()
        tasks = [asyncio.create_task(d.serve(http, visits["http"], tuple(visits["pace_s"]),
                                             lambda: state["running"])) for d in devices]
        await _wait_cmd(commands, "finish")
        state["running"] = False
        stop_ms = wall_ms()
        # Visits under way end by themselves (their vote is made); then the acks come.
        await asyncio.wait(tasks, timeout=visits.get("finish_timeout_s", 60))
        for task in tasks:
            task.cancel()
        deadline = time.monotonic() + visits.get("ack_timeout_s", 60)
        while time.monotonic() < deadline and any(d.depth() for d in devices):
            await asyncio.sleep(0.2)
    stats = devices[0].stats if devices else _new_stats()
    votes = [[d.device_id, seq] + entry[:3] for d in devices for seq, entry in d.votes.items()]
    _emit({"ev": "done", "go_ms": go_ms, "stop_ms": stop_ms, "end_ms": wall_ms(),
           "votes": votes, "unacked": sum(d.depth() for d in devices), "stats": stats,
           "cpu_s": round(time.process_time() - cpu0, 3)})


async def _subscriber(job: dict, commands: asyncio.Queue) -> None:
    """The baseline's receiver: what mosquitto delivers to one QoS 1 subscriber."""
    loop = asyncio.get_running_loop()
    driver = PahoLoop(loop)
    got = {"n": 0, "first_ms": 0, "last_ms": 0}
    ready = asyncio.Event()
    expect = int(job["expect"])
    complete = asyncio.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe("pj/+/up/vote", qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        ready.set()

    def on_message(client, userdata, message):
        now = wall_ms()
        got["n"] += 1
        got["first_ms"] = got["first_ms"] or now
        got["last_ms"] = now
        if got["n"] >= expect:
            complete.set()

    client = _client(job["client_id"], job["user"], job["password"], clean=True)
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    driver.attach(client)
    misc = loop.create_task(driver.misc())
    _connect(client, job["host"], int(job["port"]))
    await asyncio.wait_for(ready.wait(), 30)
    _emit({"ev": "ready", "connected": 1, "devices": 0})
    cmd = await _wait_cmd(commands, "go")
    if cmd.get("cmd") == "go":
        # Stop when all came, or when nothing came for idle_s (the broker dropped some).
        idle_s = job.get("idle_s", 3.0)
        cpu0 = time.process_time()
        deadline = time.monotonic() + job.get("timeout_s", 300)
        while not complete.is_set() and time.monotonic() < deadline:
            seen = got["n"]
            try:
                await asyncio.wait_for(complete.wait(), idle_s)
            except asyncio.TimeoutError:
                if got["n"] == seen and seen:
                    break
        _emit({"ev": "done", "received": got["n"], "first_ms": got["first_ms"],
               "last_ms": got["last_ms"], "cpu_s": round(time.process_time() - cpu0, 3)})
    misc.cancel()
    client.disconnect()


async def _probe(job: dict, commands: asyncio.Queue) -> None:
    """The broker hop under load: hub user -> broker -> one device login, QoS 1."""
    loop = asyncio.get_running_loop()
    driver = PahoLoop(loop)
    topic = "pj/%s/dn/bench" % job["device"]["d"]
    delays: list[int] = []
    subscribed = asyncio.Event()
    warm = asyncio.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe(topic, qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        subscribed.set()

    def on_message(client, userdata, message):
        try:
            body = json.loads(message.payload)
            sent = body["sent_ms"]
        except (ValueError, KeyError, TypeError):
            return
        if body.get("warmup"):
            warm.set()
            return
        delays.append(round(time.time() * 1000 - sent, 2))

    receiver = _client(job["device"]["d"] + "-probe", job["device"]["d"],
                       job["device"]["password"], clean=True)
    receiver.on_connect, receiver.on_subscribe = on_connect, on_subscribe
    receiver.on_message = on_message
    sender = _client(job["client_id"], job["user"], job["password"], clean=True)
    driver.attach(receiver)
    driver.attach(sender)
    misc = loop.create_task(driver.misc())
    _connect(receiver, job["host"], int(job["port"]))
    _connect(sender, job["host"], int(job["port"]))
    await asyncio.wait_for(subscribed.wait(), 30)
    # The first message on fresh connections waits ~40 ms (delayed ACK meeting Nagle on the
    # broker's socket); it is sent and dropped before the measurement.
    pad = "x" * 280  # vote-sized: a vote is 230-330 bytes on the wire
    sender.publish(topic, json.dumps({"sent_ms": 0, "warmup": True, "pad": pad}), qos=1)
    await asyncio.wait_for(warm.wait(), 30)
    _emit({"ev": "ready", "connected": 2, "devices": 0})
    cmd = await _wait_cmd(commands, "go")
    if cmd.get("cmd") == "go":
        every = job.get("every_ms", 100) / 1000.0

        async def send():
            while True:
                sender.publish(topic, json.dumps({"sent_ms": time.time() * 1000, "pad": pad}),
                               qos=1)
                await asyncio.sleep(every)

        sending = loop.create_task(send())
        await _wait_cmd(commands, "finish")
        sending.cancel()
        await asyncio.sleep(0.5)
        _emit({"ev": "done", "delays_ms": delays})
    misc.cancel()
    receiver.disconnect()
    sender.disconnect()


async def _main() -> None:
    reader = await _stdin_reader()
    try:
        job: Any = json.loads(await reader.readline())
    except ValueError:
        raise ValueError("the first stdin line must be a JSON job") from None
    commands: asyncio.Queue = asyncio.Queue()
    reading = asyncio.create_task(_read_commands(reader, commands))
    role = job["role"]
    try:
        if role == "devices":
            await _devices(job, commands)
        elif role == "subscriber":
            await _subscriber(job, commands)
        elif role == "probe":
            await _probe(job, commands)
        else:
            raise ValueError("unknown role %r" % role)
    finally:
        reading.cancel()


def main() -> int:
    try:
        asyncio.run(_main())
    except Exception as exc:  # noqa: BLE001 - the parent reads why from this line
        _emit({"ev": "error", "error": "%s: %s" % (exc.__class__.__name__, exc)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
