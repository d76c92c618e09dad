"""`pingjia sim run`: a hall of simulated evaluators, end to end, and what became of every vote.

One run: a hub (which supervises mosquitto) and the reference provincial receiver start as
subprocesses in a work folder (or running ones are used), N devices are provisioned
(windows W001…), staff sign in, N MicroPython device processes boot, and simulated
citizens walk M visits through the counters via the hub's HTTP API. A rogue client with a
valid broker login injects forged and replayed votes on the side. The run waits until the
province holds every record the devices made durable (or the deadline passes) and then
compares the two ends: every durable vote must be at the province exactly once and
unaltered, and nothing forged may be. docs/simulator.md explains the summary.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp

from hub import PingjiaError
from simulator import build as fwbuild
from simulator.citizens import Citizens, HubAPI, Mix, Visit
from simulator.fleet import DEFAULT_HEAP, Fleet, FleetError
from simulator.live import LiveView, Progress
from simulator.proxy import NetworkProxy

ROOT = fwbuild.ROOT
STAFF_NAMES = ("王芳", "李娜", "张伟", "刘洋", "陈静", "杨䶮", "赵敏", "黄磊", "周杰", "吴霞")
FORGED_SEQ_BASE = 3_000_000_000  # far above any sequence a simulated device reaches


class SimError(PingjiaError):
    """The simulated hall could not be set up or run."""


@dataclass
class Options:
    devices: int = 20
    votes: int = 60  # visits in total, spread over the windows
    heap: str = DEFAULT_HEAP
    seed: int | None = None
    deadline_s: float = 300.0
    hub_config: str | None = None  # use this running hub instead of starting one
    province_url: str | None = None  # use this running receiver instead of starting one
    workdir: str | None = None
    keep: bool = False  # keep the work folder after the run
    forged: bool = True
    mix: Mix = field(default_factory=Mix)
    # Set by chaos and the demo, not by `sim run`'s command line:
    province_faults: bool = False  # start the receiver with its /_control/faults switch
    via_proxy: bool = False  # devices reach the broker through simulator/proxy.py
    http_port: int | None = None  # the hub's HTTP port (default: a free one)
    province_port: int | None = None  # the receiver's port (default: a free one)
    # [province] settings for the hub this run starts (e.g. shorter timeouts and retry
    # cap, so a run's province outages drain in seconds rather than a minute).
    hub_province: dict = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[int], p: float) -> int | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(p / 100.0 * len(ordered) + 0.5)) - 1))]


class Service:
    """A CPython component run as a child process (hub or province) in its own session,
    so stopping it also stops what it started (the hub's mosquitto)."""

    def __init__(self, name: str, argv: list[str], log_path: str, cwd: str):
        self.name = name
        self.argv = argv
        self.cwd = cwd
        self.log_path = log_path
        self.down = False  # killed on purpose (chaos) and not restarted yet
        self.starts = 0
        self.proc: subprocess.Popen = self._start()

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        log = open(self.log_path, "ab")
        try:
            proc = subprocess.Popen(self.argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                    cwd=self.cwd, env=env, start_new_session=True)
        finally:
            log.close()
        self.starts += 1
        return proc

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process itself (a crash): what it started in sessions of their own
        (the hub's broker) lives on, as it would."""
        self.down = True
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def restart(self) -> None:
        if self.proc.poll() is None:
            return
        self.proc = self._start()
        self.down = False

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                return
        # Whatever is left of the group (a broker whose parent died) goes too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)

    def tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:]).strip()
        except OSError:
            return ""


def _python_cmd(module_attr: str, *args: str) -> list[str]:
    # Run a click command object directly: no dependency on PATH or on the console script.
    module, attr = module_attr.rsplit(".", 1)
    # SIGTERM when the simulator dies, so a killed run leaves nothing behind: the hub then
    # stops its broker on its way out.
    code = ("import signal, sys; from simulator.fleet import die_with_parent; "
            "die_with_parent(signal.SIGTERM); from %s import %s as c; "
            "c.main(sys.argv[1:], prog_name='pingjia')" % (module, attr))
    return [sys.executable, "-c", code, *args]


class Hall:
    """Hub + province + provisioned devices for one run."""

    def __init__(self, opts: Options, workdir: str, say: Callable[[str], None]):
        self.opts = opts
        self.workdir = workdir
        self.say = say
        self.services: list[Service] = []
        self.settings: Any = None
        self.http_url = ""
        self.province_url = ""
        self.provisioned: dict[str, Any] = {}  # device_id -> Provisioned
        self.windows: dict[str, str] = {}  # device_id -> window

    # ---- set-up --------------------------------------------------------------------------
    def prepare(self) -> None:
        from hub.broker import write_broker_files
        from hub.keys import ensure_signing_key, public_key_pem
        from hub.settings import Settings, write_default

        if self.opts.hub_config:
            self.settings = Settings.load(self.opts.hub_config)
            self.province_url = (self.opts.province_url or
                                 self.settings.province.endpoint.rsplit("/api/", 1)[0])
        else:
            province_port = self.opts.province_port or free_port()
            self.province_url = self.opts.province_url or "http://127.0.0.1:%d" % province_port
            self.settings = write_default(
                os.path.join(self.workdir, "hub", "hub.toml"),
                hub={"id": "sim-hall"},
                broker={"host": "127.0.0.1", "port": free_port()},
                http={"host": "127.0.0.1", "port": self.opts.http_port or free_port()},
                province=dict(self.opts.hub_province, endpoint=self.province_url + "/api/v1"))
            key = ensure_signing_key(self.settings.signing_key_path)
            write_broker_files(self.settings)
            self.public_pem = os.path.join(self.workdir, "hub-public.pem")
            with open(self.public_pem, "wb") as f:
                f.write(public_key_pem(key))
            if not self.opts.province_url:
                self.province_port = province_port
        self.http_url = "http://%s:%d" % (_connect_host(self.settings.http.host),
                                          self.settings.http.port)
        self._provision()

    def _provision(self) -> None:
        from hub.provision import add_device, list_devices

        existing = {d.device_id for d in list_devices(self.settings)} if self.opts.hub_config else set()
        for i in range(1, self.opts.devices + 1):
            device_id, window = "D%03d" % i, "W%03d" % i
            if self.opts.hub_config:
                # A shared hub: names of this run's own, so earlier runs are never touched.
                device_id = "SIM%s-%s" % (self.run_tag, device_id)
                window = "SIM%s-%s" % (self.run_tag, window)
            self.provisioned[device_id] = add_device(self.settings, device_id, window=window,
                                                     label="simulated", replace=device_id in existing)
            self.windows[device_id] = window

    @property
    def run_tag(self) -> str:
        if not hasattr(self, "_tag"):
            self._tag = "%04x" % random.getrandbits(16)
        return self._tag

    def start_services(self) -> None:
        if not self.opts.hub_config:
            wanted = [(self.settings.http.port, "hub HTTP")]
            if not self.opts.province_url:
                wanted.append((self.province_port, "province"))
            for port, what in wanted:
                if _port_taken(port):
                    raise SimError("port %d (%s) is already in use on 127.0.0.1" % (port, what))
        if not self.opts.province_url and not self.opts.hub_config:
            self.services.append(Service("province", _python_cmd(
                "simulator.province_cli.serve", "--host", "127.0.0.1",
                "--port", str(self.province_port),
                "--db", os.path.join(self.workdir, "province.db"), "--trust", self.public_pem,
                *(["--faults"] if self.opts.province_faults else [])),
                os.path.join(self.workdir, "province.log"), self.workdir))
        if not self.opts.hub_config:
            self.services.append(Service("hub", _python_cmd(
                "hub.cli_run.run", "--config", self.settings.source, "--log-level", "warning"),
                os.path.join(self.workdir, "hub.log"), self.workdir))

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for name, url in (("province", self.province_url + "/healthz"),
                          ("hub", self.http_url + "/healthz")):
            while True:
                self.check_services()
                try:
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            break
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise SimError("%s did not come up at %s" % (name, url))
                await asyncio.sleep(0.2)

    def check_services(self) -> None:
        for service in self.services:
            if not service.down and not service.alive():
                raise SimError("%s exited: %s" % (service.name, service.tail(3) or "no output"))

    def service(self, name: str) -> Service | None:
        for service in self.services:
            if service.name == name:
                return service
        return None

    def broker_pid(self) -> int | None:
        """The running mosquitto of this hall's hub, if any."""
        from hub.broker import running_pid

        return running_pid(self.settings) if self.settings is not None else None

    def stop(self) -> None:
        # The hub first (it stops its broker), then the province.
        for service in sorted(self.services, key=lambda s: s.name != "hub"):
            service.stop()
        if self.services and not self.opts.hub_config and self.settings is not None:
            # The hub runs mosquitto in a session of its own; should the hub have died
            # before stopping it, this run's broker is stopped here.
            from hub.broker import running_pid

            pid = running_pid(self.settings)
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def device_config(self, device_id: str) -> dict:
        from hub.provision import device_config

        return device_config(self.provisioned[device_id])


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        # As the servers bind: a port whose old connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


# ---- the province's view -------------------------------------------------------------------

class ProvinceView:
    """Everything the receiver holds, fetched page by page as it arrives."""

    # Each poll reads again the last second it has seen: a record committed in the same
    # millisecond as the last one of a page, just after that page was read, is not missed.
    OVERLAP_MS = 1000

    def __init__(self, session: aiohttp.ClientSession, base_url: str):
        self.session = session
        self.base = base_url.rstrip("/")
        self.records: dict[str, dict] = {}
        self.after_ms = 0
        self.repeats = 0  # a voteId listed again in another batch (its key forbids that)
        self.poll_errors = 0

    async def poll(self, must: bool = False) -> None:
        """Fetch what arrived since the last poll. A failed poll is counted and retried at
        the next one (the receiver is busy or the machine loaded), unless `must`."""
        try:
            await self._poll()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
            self.poll_errors += 1
            if must:
                raise SimError("province records: %s" % (exc.__class__.__name__,)) from None

    async def _poll(self) -> None:
        after = max(0, self.after_ms - self.OVERLAP_MS)
        while True:
            url = "%s/api/v1/records?after_ms=%d&limit=2000" % (self.base, after)
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
                if resp.status != 200:
                    raise SimError("province records: HTTP %d" % resp.status)
                page = await resp.json()
            for record in page["records"]:
                vote_id = record["voteId"]
                known = self.records.get(vote_id)
                if known is not None and known.get("batch_id") != record.get("batch_id"):
                    self.repeats += 1
                self.records[vote_id] = record
            after = max(after, page.get("last_ms") or after)
            if not page.get("more"):
                break
        self.after_ms = max(self.after_ms, after)

    async def stats(self) -> dict:
        async with self.session.get(self.base + "/api/v1/stats",
                                    timeout=aiohttp.ClientTimeout(total=15)) as resp:
            return await resp.json()


# ---- forged and replayed votes -----------------------------------------------------------------

@dataclass
class Forgeries:
    fresh: list[str] = field(default_factory=list)  # voteIds no device ever made
    tampered: dict[str, int] = field(default_factory=dict)  # genuine voteId -> forged stars
    replayed: list[str] = field(default_factory=list)  # genuine voteIds sent again verbatim
    cross: list[str] = field(default_factory=list)  # another device's topic (ACL must drop)
    sent: int = 0
    errors: list[str] = field(default_factory=list)


def _victim(fleet: Fleet) -> tuple[str, list]:
    """The device with the most durable votes, and those votes (taken on the loop thread)."""
    best = max(fleet.devices.values(),
               key=lambda d: (sum(1 for s in d.saved.values() if s.kind == "v"), d.device_id))
    return best.device_id, [s for s in list(best.saved.values()) if s.kind == "v"]


def inject_forgeries(settings: Any, provisioned: dict, victim: str, genuine: list,
                     rng: random.Random) -> Forgeries:
    """A rogue client logs in with device A's valid broker credentials (another client id)
    and publishes: votes signed with a wrong key, a genuine vote with its stars changed,
    genuine votes replayed verbatim, and a vote on device B's topic."""
    import paho.mqtt.client as paho

    from firmware.evaluator import codec

    out = Forgeries()
    others = [d for d in sorted(provisioned) if d != victim]
    other = others[0] if others else victim
    cred = provisioned[victim]
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="rogue-" + victim)
    client.username_pw_set(cred.mqtt_user, cred.mqtt_password)
    try:
        client.connect(_connect_host(settings.broker.host), settings.broker.port)
    except OSError as exc:
        out.errors.append("rogue connect: %s" % exc)
        return out
    client.loop_start()
    try:
        wrong_key = bytes(rng.getrandbits(8) for _ in range(32))
        now = int(time.time())
        window = cred.window or ""

        def send(device_id: str, payload: bytes) -> None:
            info = client.publish("pj/%s/up/vote" % device_id, payload, qos=1)
            info.wait_for_publish(10)
            out.sent += 1

        for i in range(3):
            seq = FORGED_SEQ_BASE + i
            vote = codec.make_vote(wrong_key, victim, seq, now, "v", "FORGED%d" % i, "", 5, [],
                                   "", window, "10001")
            send(victim, codec.encode_vote(vote))
            out.fresh.append("%s:%d" % (victim, seq))
        for saved in genuine[:2]:
            vote = json.loads(saved.payload)
            send(victim, saved.payload.encode())  # replay: identical, MAC and all
            out.replayed.append("%s:%d" % (victim, saved.seq))
            forged_stars = 1 if vote["stars"] >= 3 else 5
            vote.update(stars=forged_stars, rs=["S01"] if forged_stars <= 2 else [], cv="nat-2024.1"
                        if forged_stars <= 2 else "")
            send(victim, json.dumps(vote).encode())  # tampered: the MAC no longer matches
            out.tampered["%s:%d" % (victim, saved.seq)] = forged_stars
        if other != victim:
            seq = FORGED_SEQ_BASE + 10
            vote = codec.make_vote(wrong_key, other, seq, now, "v", "FORGEDX", "", 4, [], "",
                                   "", "")
            send(other, codec.encode_vote(vote))  # the broker ACL must drop it
            out.cross.append("%s:%d" % (other, seq))
    except (OSError, RuntimeError, ValueError) as exc:
        out.errors.append("rogue publish: %s" % exc)
    finally:
        client.loop_stop()
        client.disconnect()
    return out


# ---- one hall, set up and torn down ----------------------------------------------------------

class Session:
    """The moving parts of one run on the caller's loop: the hall's services, the device
    fleet (optionally behind the network proxy), the citizens' HTTP session, the province's
    view. `open()` brings everything up with every device online and idle; `close()` stops
    all of it, whatever state it is in."""

    def __init__(self, opts: Options, workdir: str, say: Callable[[str], None]):
        self.opts = opts
        self.workdir = workdir
        self.say = say
        self.started = time.monotonic()
        self.hall = Hall(opts, workdir, say)
        self.fleet = Fleet(os.path.join(workdir, "devices"), build_dir=os.path.join(
            fwbuild.ROOT, "build", "sim-mpy"), heap=opts.heap)
        self.proxy: NetworkProxy | None = None
        self.http: aiohttp.ClientSession | None = None
        self.hub_api: HubAPI | None = None
        self.province: ProvinceView | None = None
        self.token: str | None = None  # the citizens' business-system token, if any

    async def open(self, before_start: Callable[[Hall], Any] | None = None) -> None:
        """Bring the hall up. `before_start(hall)` runs once the hub's settings and store
        exist and before any service starts (the demo registers its logins there)."""
        opts = self.opts
        self.say("building firmware and preparing the hall in %s" % self.workdir)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.hall.prepare)
        if before_start is not None:
            await loop.run_in_executor(None, before_start, self.hall)
        self.hall.start_services()
        # Every window's citizen may have a request open at once (a prompt waits for the
        # device's answer): the pool must not make the run's own polls queue behind them.
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            limit=max(100, 2 * opts.devices + 20)))
        await self.hall.wait_ready(self.http)
        self.hub_api = HubAPI(self.http, self.hall.http_url, self.token)
        self.province = ProvinceView(self.http, self.hall.province_url)
        await self.fleet.start()
        if opts.via_proxy:
            broker = self.hall.settings.broker
            self.proxy = NetworkProxy(_connect_host(broker.host), broker.port)
        for n, device_id in enumerate(sorted(self.hall.provisioned)):
            window = self.hall.windows[device_id]
            await self.hub_api.sign_in(window, "1%04d" % (n + 1), STAFF_NAMES[n % len(STAFF_NAMES)])
            config = self.hall.device_config(device_id)
            if self.proxy is not None:
                config["hub_host"] = "127.0.0.1"
                config["hub_port"] = await self.proxy.add(device_id)
            self.fleet.add(device_id, config)
        self.say("booting %d devices (heap %s each)" % (len(self.fleet.devices), opts.heap))
        for device_id in self.fleet.devices:
            await self.fleet.spawn(device_id)
        await self.fleet.wait_for(lambda: all(d.connected and d.state == "IDLE"
                                              for d in self.fleet.devices.values()),
                                  60 + 2 * opts.devices, "every device online and idle")
        await self.hub_sees_online(60 + opts.devices)
        self.say("%d devices online" % len(self.fleet.devices))

    async def hub_sees_online(self, timeout: float) -> None:
        """Until the hub has ingested every device's birth: it refuses prompts for a device
        it does not know to be online (503), and a device's "conn" event comes first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        want = len(self.fleet.devices)
        while True:
            status = await _hub_status(self.http, self.hall.http_url)
            online = (status.get("devices") or {}).get("online")
            if status and (online is None or online >= want):
                return  # (a hub that does not report presence does not check it either)
            if loop.time() > deadline:
                raise SimError("the hub sees %s of %d devices online" % (online, want))
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        try:
            await self.fleet.close()
        finally:
            if self.proxy is not None:
                await self.proxy.close()
            if self.http is not None:
                await self.http.close()
            await asyncio.get_running_loop().run_in_executor(None, self.hall.stop)

    def windows_visits(self, total: int) -> dict[str, int]:
        return _spread(total, sorted(self.fleet.devices))

    async def forge(self, rng: random.Random) -> Forgeries:
        """The rogue client's round (in a thread: paho blocks)."""
        return await asyncio.get_running_loop().run_in_executor(
            None, inject_forgeries, self.hall.settings, self.hall.provisioned,
            *_victim(self.fleet), rng)

    async def serve_out(self, serving: asyncio.Future, deadline: float,
                        show: Callable[[str], None],
                        each: Callable[[], Awaitable[None]] | None = None) -> None:
        """Until the citizens' visits (`serving`) are over, or the deadline passed (then the
        rest are cancelled): every half second the services are checked, `each()` runs,
        the province is polled and progress shown."""
        while not serving.done():
            await asyncio.sleep(0.5)
            self.hall.check_services()
            if each is not None:
                await each()
            await self.province.poll()
            show("citizens")
            if time.monotonic() > deadline:
                serving.cancel()
                break
        try:
            await serving
        except asyncio.CancelledError:
            pass

    async def drain(self, deadline: float, show: Callable[[str], None]) -> None:
        """Until the province holds every durable record (or the deadline passes), then a
        moment more: anything forged or doubled would arrive with the last batches."""
        while time.monotonic() < deadline:
            await self.province.poll()
            show("draining")
            # At rest too: a prompt still on a screen (its citizen's request timed out, or
            # it arrived late) ends in an unrated record once its ttl passes.
            if _missing(self.fleet, self.province) == 0 and self._at_rest():
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.5)
        await self.province.poll(must=True)

    def _at_rest(self) -> bool:
        return all(d.state in ("IDLE", "OFF", "FULL") or not d.alive
                   for d in self.fleet.devices.values())

    async def gather_counters(self) -> tuple[dict, dict]:
        """Every device's counters, the province's stats and the hub's status."""
        async def one(device_id):
            try:
                await self.fleet.stats(device_id)
            except FleetError:
                pass
        await asyncio.gather(*(one(d) for d in self.fleet.devices))
        pstats = await self.province.stats()
        hub_status = await _hub_status(self.http, self.hall.http_url)
        return pstats, hub_status

    def write_visits(self, visits: list[Visit]) -> None:
        """visits.jsonl in the work folder: one line per visit, for reading a failed run."""
        from dataclasses import asdict

        with open(os.path.join(self.workdir, "visits.jsonl"), "w") as f:
            for visit in visits:
                f.write(json.dumps(asdict(visit), ensure_ascii=False) + "\n")

    def progress(self, citizens: Citizens | None, phase: str, total: int | None) -> Progress:
        durable = _durable_ids(self.fleet)
        reported = [s for s in durable.values() if s.reported]
        visits = citizens.outcome.visits if citizens is not None else []
        return Progress(
            phase=phase, visits_total=total,
            visits_done=sum(1 for v in visits if v.seq or v.error or v.cut_after_press),
            cast=sum(1 for s in reported if s.kind == "v"),
            unrated=sum(1 for s in reported if s.kind == "u"),
            at_province=sum(1 for v in durable if v in self.province.records),
            misuse=sum(v.misuse_presses for v in visits),
            cut_presses=sum(1 for v in visits if v.cut_after_press),
            devices_down=sum(1 for d in self.fleet.devices.values() if not d.alive))


# ---- the run --------------------------------------------------------------------------------

async def _run(opts: Options, workdir: str, say: Callable[[str], None], live: LiveView) -> dict:
    rng = random.Random(opts.seed)
    session = Session(opts, workdir, say)
    try:
        await session.open()
        fleet, hall, province = session.fleet, session.hall, session.province
        say("citizens arrive")
        citizens = Citizens(fleet, session.hub_api, rng, opts.mix)
        visits = session.windows_visits(opts.votes)
        serving = asyncio.gather(*(citizens.serve(d, hall.windows[d], n)
                                   for d, n in visits.items() if n))
        deadline = session.started + opts.deadline_s
        forgeries = Forgeries()

        def show(phase):
            live.show(session.progress(citizens, phase, opts.votes))

        async def forge_once():
            nonlocal forgeries
            if opts.forged and not forgeries.sent and len(_victim(fleet)[1]) >= 2:
                forgeries = await session.forge(rng)

        await session.serve_out(serving, deadline, show, forge_once)
        if opts.forged and not forgeries.sent:
            forgeries = await session.forge(rng)
        # Everything durable on a device must reach the province.
        await session.drain(deadline, show)
        pstats, hub_status = await session.gather_counters()
        live.end()
        session.write_visits(citizens.outcome.visits)
        return _summary(opts, fleet, citizens.outcome.visits, province, pstats, hub_status,
                        forgeries, time.monotonic() - session.started,
                        time.monotonic() <= deadline, hall)
    finally:
        live.end()
        await session.close()


def _spread(total: int, device_ids: list[str]) -> dict[str, int]:
    base, extra = divmod(total, max(len(device_ids), 1))
    return {d: base + (1 if i < extra else 0) for i, d in enumerate(device_ids)}


def _durable_ids(fleet: Fleet) -> dict[str, Any]:
    """Every record durable on a device (reported or found in its flash after a cut)."""
    return {"%s:%d" % (d.device_id, s.seq): s for d in fleet.devices.values()
            for s in list(d.saved.values())}


def _missing(fleet: Fleet, province: ProvinceView) -> int:
    return sum(1 for vote_id in _durable_ids(fleet) if vote_id not in province.records)


async def _hub_status(session: aiohttp.ClientSession, url: str) -> dict:
    try:
        async with session.get(url + "/api/v1/status",
                               timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return await resp.json()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return {}


def _summary(opts: Options, fleet: Fleet, visits: list[Visit], province: ProvinceView,
             pstats: dict, hub_status: dict, forgeries: Forgeries, elapsed: float,
             in_time: bool, hall: Hall) -> dict:
    """The run's verdict. Visits a resilient citizen gave up on (faults met every attempt)
    are counted in `visits_given_up`, not as errors: they are no vote, not a lost one."""
    from hub.batch import load_profile

    satisfaction = load_profile(hall.settings.province.profile)["satisfaction"]
    durable = _durable_ids(fleet)
    reported = {k: s for k, s in durable.items() if s.reported}
    # Found in a device's flash after a power cut, never reported: durable (so they must
    # reach the province, and count in `lost`), but the citizen was never thanked.
    unreported = {k: s for k, s in durable.items() if not s.reported}
    votes = {k: s for k, s in reported.items() if s.kind == "v"}
    unrated = {k: s for k, s in reported.items() if s.kind == "u"}
    at_province = {k: r for k, r in province.records.items() if k in durable}
    altered = 0
    for vote_id, saved in list(votes.items()) + [kv for kv in unreported.items()
                                                 if kv[1].kind == "v"]:
        record = at_province.get(vote_id)
        if record is not None and str(record.get("satisfaction")) != str(satisfaction[str(saved.stars)]):
            altered += 1
    forged_accepted = sum(1 for v in forgeries.fresh + forgeries.cross if v in province.records)
    for vote_id, stars in forgeries.tampered.items():
        record = province.records.get(vote_id)
        if record is not None and str(record.get("satisfaction")) == str(satisfaction[str(stars)]):
            forged_accepted += 1
    # Anything at the province for our devices that no device made durable is forged too.
    ours = {d for d in fleet.devices}
    strangers = [v for v in province.records if v.rsplit(":", 1)[0] in ours and v not in durable
                 and v not in forgeries.fresh]
    forged_accepted += len(strangers)
    latencies = []
    pressed = {(v.device_id, v.seq): v.pressed_ms for v in visits if v.seq and v.pressed_ms}
    for vote_id, saved in votes.items():
        record = at_province.get(vote_id)
        at = pressed.get((saved.device_id, saved.seq))
        if record is not None and at:
            latencies.append(int(record["received_at_ms"]) - at)
    misuse = sum(int(d.stats.get("misuse", 0)) for d in fleet.devices.values())
    errors = [v for v in visits if v.error and not v.gave_up]
    conflicts = sum(len(d.seq_conflicts) for d in fleet.devices.values())
    summary = {
        "devices": len(fleet.devices),
        "visits": len(visits),
        "votes_cast": len(votes),
        "votes_at_province": sum(1 for k in votes if k in at_province),
        "unrated": len(unrated),
        "unrated_at_province": sum(1 for k in unrated if k in at_province),
        "duplicates_at_province": int(pstats.get("duplicates", 0)) + province.repeats,
        "lost": sum(1 for k in durable if k not in at_province),
        "altered_at_province": altered,
        "forged_sent": forgeries.sent,
        "forged_accepted": forged_accepted,
        "misuse_presses": misuse,
        "misuse_presses_made": sum(v.misuse_presses for v in visits),
        "bad_ratings": sum(1 for s in votes.values() if s.stars <= 2),
        "latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                       "max": max(latencies) if latencies else None},
        "device_heap_peak_bytes": max((d.heap_live_max for d in fleet.devices.values()), default=0),
        "device_heap_bytes": max((d.heap_size for d in fleet.devices.values()), default=0),
        "device_heap_option": opts.heap,
        # micropython.mem_peak() counts every byte ever allocated minus explicit frees, so
        # with a garbage collector it overstates the footprint; kept for comparison.
        "device_mem_peak_bytes": max((d.mem_peak for d in fleet.devices.values()), default=0),
        "device_crashes": len(fleet.crashed()),
        "device_backlog": sum(int(d.stats.get("jd", 0) or 0) for d in fleet.devices.values()),
        "seq_conflicts": conflicts,
        "visit_errors": len(errors),
        "visits_given_up": sum(1 for v in visits if v.gave_up),
        "visit_error_examples": [v.error for v in errors[:3]],
        "hub_rejections": hub_status.get("rejections", {}),
        "forgery_errors": forgeries.errors,
        "finished_in_time": in_time,
        "elapsed_s": round(elapsed, 1),
        "seed": opts.seed,
    }
    if unreported or any(v.cut_after_press for v in visits):
        summary["durable_unreported"] = len(unreported)
        summary["durable_unreported_at_province"] = sum(1 for k in unreported if k in at_province)
    summary["ok"] = bool(
        in_time and summary["lost"] == 0 and summary["duplicates_at_province"] == 0
        and summary["forged_accepted"] == 0 and altered == 0 and not summary["device_crashes"]
        and summary["votes_at_province"] == summary["votes_cast"] and not forgeries.errors
        and not errors and not conflicts and not fleet.flash_errors)
    return summary


def run(opts: Options, say: Callable[[str], None] = lambda line: None,
        live: bool = False) -> dict:
    """Run one simulation and return its summary (see docs/simulator.md)."""
    check_options(opts)
    return in_workdir(opts, lambda workdir: _run(opts, workdir, say, LiveView(live)))


def check_options(opts: Options) -> None:
    if opts.devices < 1 or opts.votes < 0:
        raise SimError("need at least one device and a non-negative number of visits")
    if opts.seed is None:
        opts.seed = random.randrange(1 << 30)


def in_workdir(opts: Options, main: Callable[[str], Any]) -> dict:
    """Run `main(workdir)` (a coroutine returning the summary) in the run's work folder:
    a temporary one unless --workdir named one, removed after a good run unless --keep."""
    own = opts.workdir is None
    workdir = opts.workdir or tempfile.mkdtemp(prefix="pingjia-sim-")
    os.makedirs(workdir, exist_ok=True)
    ok = False
    try:
        summary = asyncio.run(main(workdir))
        ok = summary.get("ok", False)
        summary["workdir"] = workdir if (opts.keep or not own or not ok) else None
        return summary
    finally:
        if own and ok and not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def format_summary(summary: dict) -> str:
    lat = summary["latency_ms"]
    lines = [
        "devices %d, visits %d in %.1f s (seed %s)" % (summary["devices"], summary["visits"],
                                                      summary["elapsed_s"], summary["seed"]),
        "votes cast (durable on devices)  %d, of them bad ratings %d" % (
            summary["votes_cast"], summary["bad_ratings"]),
        "votes at the province            %d" % summary["votes_at_province"],
        "unrated records                  %d (at the province %d)" % (
            summary["unrated"], summary["unrated_at_province"]),
        "lost                             %d" % summary["lost"],
        "duplicates at the province       %d" % summary["duplicates_at_province"],
        "altered at the province          %d" % summary["altered_at_province"],
        "forged sent / accepted           %d / %d" % (summary["forged_sent"],
                                                      summary["forged_accepted"]),
        "misuse presses counted / made    %d / %d" % (summary["misuse_presses"],
                                                      summary["misuse_presses_made"]),
        "latency press->province p50/p99  %s / %s ms" % (lat["p50"], lat["p99"]),
        "device heap peak                 %d of %d bytes (-X heapsize=%s)" % (
            summary["device_heap_peak_bytes"], summary["device_heap_bytes"],
            summary["device_heap_option"]),
        "hub rejections                   %s" % (", ".join(
            "%s %s" % kv for kv in sorted(summary["hub_rejections"].items())) or "none"),
    ]
    if "faults" in summary:
        lines.append("faults injected                  %s" % (", ".join(
            "%s %d" % kv for kv in summary["faults"].items()) or "none"))
        lines.append("presses lost to power cuts       %d (not cast)" %
                     summary["presses_lost_to_power_cut"])
        lines.append("durable but unreported           %d (at the province %d)" % (
            summary.get("durable_unreported", 0),
            summary.get("durable_unreported_at_province", 0)))
        lines.append("visits disrupted / retried       %d / %d" % (
            summary["visits_disrupted"], summary["visit_retries"]))
        if summary.get("faults_missing"):
            lines.append("fault kinds that never fired     %s" % ", ".join(
                summary["faults_missing"]))
    if summary["visit_errors"]:
        lines.append("visit errors                     %d, e.g. %s" % (
            summary["visit_errors"], "; ".join(summary["visit_error_examples"])))
    if summary["device_crashes"]:
        lines.append("device crashes                   %d" % summary["device_crashes"])
    if summary.get("seq_conflicts"):
        lines.append("sequence numbers reused          %d" % summary["seq_conflicts"])
    if not summary["finished_in_time"]:
        lines.append("the deadline passed before the province held everything")
    if summary.get("workdir"):
        lines.append("work folder kept: %s" % summary["workdir"])
    lines.append("OK" if summary["ok"] else "FAILED")
    return "\n".join(lines)
