"""Simulated citizens at the counters: the service ends, the device asks, the citizen answers.

For each visit the window's business system (here: this module) tells the hub the service
is complete (POST /api/v1/prompts), the hub prompts the window's device, and the citizen --
after a think time -- presses a star key on the simulated board. A bad rating (1 or 2
stars) continues on the soft keys: 选择 a reason, maybe 下 and 选择 another, then 提交. Some
citizens walk away (the prompt times out: an unrated record); some press keys while no
prompt is shown (misuse, which must never make a vote). Every outcome is recorded with the
host time of the deciding key press, so the run can measure press-to-province latency.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from hub import PingjiaError
from simulator.fleet import Fleet, FleetError

# Soft keys while reasons are chosen (docs/rating.md): 5 上, 4 下, 3 选择, 2 返回, 1 提交.
KEY_DOWN = 4
KEY_TOGGLE = 3
KEY_SUBMIT = 1
# Key presses closer than the rating's rapid_ms (300) are misuse; a person is slower.
KEY_GAP_S = 0.4
KEY_GAP_MS = 350  # enforced on the device between one citizen's deliberate presses
# A resilient citizen takes a prompt for lost once the device has been online this long
# after it was sent without showing it.
LOST_PROMPT_S = 8.0

TASKS = (
    ("11440000MB2C94230X", "44000012345", "居民身份证换领"),
    ("11440000MB2C94230X", "44000012346", "营业执照变更登记"),
    ("11440000MB2C94230X", "44000012347", "社会保障卡补办"),
    ("11440000MB2C94230X", "44000012348", "不动产权证书查询"),
)


class CitizenError(PingjiaError):
    """The hub or a device did not play its part in a visit."""

    def __init__(self, message: str, http_status: int = 0, status: str = ""):
        PingjiaError.__init__(self, message)
        self.http_status = http_status  # 0: no answer at all (hub down)
        self.status = status  # the hub's "status" word, e.g. "offline", "open"


@dataclass
class Mix:
    """How the citizens behave, as shares of visits (the rest rate 3..5 stars)."""

    bad: float = 0.15  # rate 1..2 stars and choose reasons
    walk_away: float = 0.05  # never press: the prompt times out (unrated)
    misuse: float = 0.1  # press a key while nothing is asked (before the prompt)
    think_s: tuple[float, float] = (0.3, 1.5)
    walk_away_ttl_s: int = 3  # the prompt ttl asked for walk-away visits
    prompt_ttl_s: int | None = None  # the ttl asked for other prompts (None: the hub's)
    # How long the hub is asked to wait for the device's answer before it answers the
    # prompt request (None: the hub's default, 5 s). The citizens watch the device
    # themselves, so 0 costs them nothing and spares the hub a waiting request per window.
    prompt_wait_s: float | None = None
    # How long a prompt may stay on screen if the hub does not honour the ttl asked for
    # (docs/protocol.md: the hub sets `ttl`; 60 s is its default).
    hub_ttl_s: int = 60


@dataclass
class Visit:
    device_id: str
    window: str
    case_no: str
    plan: str  # good | bad | walk_away
    stars: int = 0
    pid: str = ""  # the prompt the citizen answered (or the last one asked for)
    pids: list[str] = field(default_factory=list)  # every prompt asked for this visit
    offer: str = ""  # the device's answer to the prompt: shown/busy/full/bad
    pressed_ms: int = 0  # host wall clock of the key press that decided the vote
    seq: int = 0  # the device sequence number of the durable record
    kind: str = ""  # "v" or "u" as saved
    misuse_presses: int = 0
    error: str = ""
    attempts: int = 0  # prompts tried (more than one when a fault disrupted the visit)
    disruptions: list[str] = field(default_factory=list)
    # The deciding press was made, then the power went before the device said thanks.
    cut_after_press: bool = False
    renumbered: int = 0  # follow-up case numbers issued after lost prompts
    # A resilient citizen left after `attempts` prompts all met a fault: a visit the faults
    # prevented, not a fault of the hall (error says what happened).
    gave_up: bool = False
    started_ms: int = 0  # host wall clock when the citizen stepped up, and left
    ended_ms: int = 0


@dataclass
class Outcome:
    visits: list[Visit] = field(default_factory=list)

    def count(self, **match: Any) -> int:
        return sum(1 for v in self.visits if all(getattr(v, k) == x for k, x in match.items()))


def _wall_ms() -> int:
    return int(time.time() * 1000)


class HubAPI:
    """The window business system's side of the hub's HTTP API."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str | None = None):
        self.session = session
        self.base = base_url.rstrip("/")
        self.headers = {"Authorization": "Bearer " + token} if token else {}

    async def _call(self, method: str, path: str, body: dict | None = None,
                    accept: tuple[int, ...] = ()) -> dict:
        """The JSON answer; CitizenError for an HTTP error status not in `accept`."""
        url = self.base + path
        try:
            async with self.session.request(method, url, json=body, headers=self.headers,
                                            timeout=aiohttp.ClientTimeout(total=45)) as resp:
                text = await resp.text()
                try:
                    answer = json.loads(text) if text else {}
                except ValueError:
                    answer = None
                if resp.status >= 300 and resp.status not in accept:
                    status = answer.get("status", "") if isinstance(answer, dict) else ""
                    raise CitizenError("%s %s: HTTP %d %s" % (method, path, resp.status,
                                                              text[:200]),
                                       resp.status, status if isinstance(status, str) else "")
                if not isinstance(answer, dict):
                    raise CitizenError("%s %s: answer is not a JSON object" % (method, path),
                                       resp.status)
                return answer
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise CitizenError("%s %s: %s" % (method, path, exc.__class__.__name__))

    async def sign_in(self, window: str, staff_no: str, name: str) -> dict:
        return await self._call("POST", "/api/v1/windows/%s/staff" % window,
                                {"staff_no": staff_no, "name": name})

    async def prompt(self, window: str, case_no: str, task: tuple[str, str, str], kind: str = "ji",
                     n: int = 1, ttl: int | None = None, wait_s: float | None = None) -> str:
        body = {"window": window, "case_no": case_no, "dept_code": task[0], "task_code": task[1],
                "task_name": task[2], "kind": kind, "n": n}
        if ttl:
            body["ttl"] = ttl
        if wait_s is not None:
            body["wait_s"] = wait_s
        # 409/422 with a pid: the device refused the prompt (busy, full, bad); the pid's
        # outcome arrives at the device's side too, so the caller treats it like any offer.
        answer = await self._call("POST", "/api/v1/prompts", body, accept=(409, 422))
        pid = answer.get("pid")
        if not isinstance(pid, str):
            status = answer.get("status")
            raise CitizenError("POST /api/v1/prompts: refused: %s" % (
                answer.get("error") or status), 409, status if isinstance(status, str) else "")
        return pid


class Disrupted(Exception):
    """A fault (power cut, lost prompt, hub down) interrupted a visit before its rating."""


class Citizens:
    """Walks visits through the counters of a fleet, one citizen per window at a time.

    Every window draws its citizens' choices from a random stream of its own, derived from
    `rng`, so the same seed gives every window the same citizens however the windows'
    timing interleaves.

    With `resilient` (the chaos run) a visit carries on through faults as people at a real
    counter would: the window system retries while the hub is down, a prompt that was lost
    or met a busy device is sent again once the device is back and idle (at most
    `attempts` times). A power cut after the citizen's deciding press but before the
    device said "thank you" ends the visit with `cut_after_press`; that press is not cast.
    `on_decide(device_id)` is called right after each deciding press is sent (the chaos
    run uses it to race a power cut against the journal write).
    """

    def __init__(self, fleet: Fleet, hub: HubAPI, rng: random.Random, mix: Mix | None = None,
                 step_timeout_s: float = 30.0, resilient: bool = False, attempts: int = 4,
                 fault_wait_s: float = 180.0):
        self.fleet = fleet
        self.hub = hub
        self.mix = mix or Mix()
        self.step_timeout_s = step_timeout_s
        self.resilient = resilient
        self.attempts = attempts if resilient else 1
        # How long a resilient citizen waits for a device or hub a fault took away.
        self.fault_wait_s = fault_wait_s
        self.outcome = Outcome()
        self.cases = 0
        self.on_decide: Callable[[str], None] | None = None
        self._seed = rng.getrandbits(64)
        self._rngs: dict[str, random.Random] = {}
        self._served: dict[str, int] = {}

    def rng_for(self, device_id: str) -> random.Random:
        rng = self._rngs.get(device_id)
        if rng is None:
            rng = self._rngs[device_id] = random.Random("%d:%s" % (self._seed, device_id))
        return rng

    def plan(self, rng: random.Random) -> tuple[str, int]:
        roll = rng.random()
        if roll < self.mix.walk_away:
            return "walk_away", 0
        if roll < self.mix.walk_away + self.mix.bad:
            return "bad", rng.choice((1, 2))
        return "good", rng.choice((3, 4, 5, 5, 5))

    async def serve(self, device_id: str, window: str, visits: int | None,
                    pause_s: tuple[float, float] = (0.0, 0.0)) -> list[Visit]:
        """Serve `visits` citizens at one window in turn (None: until cancelled), with a
        pause drawn from `pause_s` between them; returns their visits."""
        done = []
        rng = self.rng_for(device_id)
        n = 0
        while visits is None or n < visits:
            if n and pause_s[1] > 0:
                await asyncio.sleep(rng.uniform(*pause_s))
            done.append(await self.visit(device_id, window))
            n += 1
        return done

    # ---- waiting on a device that a fault may take away ----------------------------------
    async def _until(self, dev, boots: int, check: Callable[[], Any], timeout: float,
                     what: str) -> Any:
        """Wait for check() (see Fleet.wait_for); a power cut of the device meanwhile
        raises Disrupted."""
        def done():
            value = check()  # first: a record reported just before the cut still counts
            if value:
                return value
            if dev.boots != boots or not dev.alive:
                return "cut"
            return None

        value = await self.fleet.wait_for(done, timeout, dev.device_id + " " + what)
        if value == "cut":
            raise Disrupted("power cut during " + what)
        return value

    async def _wait_rest(self, device_id: str) -> None:
        dev = self.fleet.devices[device_id]
        timeout = self.step_timeout_s + (self.fault_wait_s if self.resilient else 60)
        await self.fleet.wait_for(lambda: dev.alive and dev.state == "IDLE" and dev.connected,
                                  timeout, device_id + " idle")

    async def _prompt(self, visit: Visit, rng: random.Random, ttl: int | None) -> str:
        task = rng.choice(TASKS)
        if not self.resilient:
            return await self.hub.prompt(visit.window, visit.case_no, task, ttl=ttl,
                                         wait_s=self.mix.prompt_wait_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.fault_wait_s
        while True:
            try:
                return await self.hub.prompt(visit.window, visit.case_no, task, ttl=ttl,
                                             wait_s=self.mix.prompt_wait_s)
            except CitizenError as exc:
                if exc.status == "open":
                    # An earlier prompt for this case was lost (the device lost power while
                    # showing it, or the hub died before publishing it); the hub keeps such
                    # a case blocked for its ttl plus a grace period (one service, one
                    # rating), so the window system follows up under a new case number.
                    visit.disruptions.append("case %s still open" % visit.case_no)
                    visit.case_no = "%s-R%d" % (visit.case_no.split("-R")[0],
                                                len(visit.pids) + 1 + visit.renumbered)
                    visit.renumbered += 1
                    continue
                if exc.http_status and exc.http_status < 500:
                    raise
                # No answer (the hub restarting) or the device offline (a power or network
                # cut): the window system keeps trying for a while.
                if loop.time() > deadline:
                    raise
                visit.disruptions.append("hub: " + str(exc)[:80])
                await asyncio.sleep(1.0)

    # ---- one visit -------------------------------------------------------------------------
    async def visit(self, device_id: str, window: str) -> Visit:
        self.cases += 1
        rng = self.rng_for(device_id)
        plan, stars = self.plan(rng)
        # Numbered per window: the same seed gives the same case numbers.
        n = self._served[device_id] = self._served.get(device_id, 0) + 1
        visit = Visit(device_id, window, "SIM-%s-%05d" % (window, n), plan, stars,
                      started_ms=_wall_ms())
        self.outcome.visits.append(visit)
        misuse = rng.random() < self.mix.misuse
        try:
            return await self._visit(visit, rng, misuse)
        finally:
            visit.ended_ms = _wall_ms()

    async def _visit(self, visit: Visit, rng: random.Random, misuse: bool) -> Visit:
        device_id = visit.device_id
        try:
            while True:
                visit.attempts += 1
                try:
                    await self._attempt(device_id, visit, rng, misuse and visit.attempts == 1)
                    return visit
                except Disrupted as exc:
                    visit.disruptions.append(str(exc))
                    if visit.cut_after_press:
                        return visit  # the press is gone; a new one would be a new vote
                    if visit.attempts >= self.attempts:
                        visit.error = "gave up after %d attempts: %s" % (visit.attempts, exc)
                        visit.gave_up = self.resilient
                        return visit
                except FleetError as exc:
                    if not self.resilient:
                        raise
                    # Typically the control channel of a device that just lost power.
                    visit.disruptions.append(str(exc)[:120])
                    if visit.attempts >= self.attempts:
                        visit.error = "gave up after %d attempts: %s" % (visit.attempts, exc)
                        visit.gave_up = True
                        return visit
                    await asyncio.sleep(0.5)
        except (FleetError, CitizenError) as exc:
            visit.error = str(exc)
        return visit

    async def _attempt(self, device_id: str, visit: Visit, rng: random.Random,
                       misuse: bool) -> None:
        dev = self.fleet.devices[device_id]
        await self._wait_rest(device_id)
        boots = dev.boots
        if misuse:
            # Presses while the device asks nothing: counted as misuse, never a vote.
            for _ in range(rng.choice((1, 2))):
                seen = dev.keys_seen
                await self.fleet.press(device_id, rng.randint(1, 5), KEY_GAP_MS)
                visit.misuse_presses += 1
                # The press must have happened before any prompt can be on screen.
                await self._until(dev, boots, lambda: dev.keys_seen > seen,
                                  self.step_timeout_s, "misuse press")
            await asyncio.sleep(KEY_GAP_S)
        ttl = self.mix.walk_away_ttl_s if visit.plan == "walk_away" else self.mix.prompt_ttl_s
        visit.pid = pid = await self._prompt(visit, rng, ttl)
        visit.pids.append(pid)
        if self.resilient:
            pid = await self._offer_resilient(dev, boots, visit)
        else:
            await self._until(dev, boots, lambda: dev.offers.get(pid), self.step_timeout_s,
                              "prompt " + pid)
            visit.offer = dev.offers[pid]
            if visit.offer != "shown":
                visit.error = "prompt " + visit.offer
                return
        if visit.plan != "walk_away":
            await asyncio.sleep(rng.uniform(*self.mix.think_s))
            if visit.plan == "bad":
                await self._bad_rating(dev, boots, visit, rng)
            else:
                await self._decide(dev, boots, visit, visit.stars)
        wait = self.step_timeout_s + (ttl or self.mix.hub_ttl_s)
        try:
            saved = await self._until(dev, boots, lambda: self._saved_for(dev, pid), wait,
                                      "durable record for " + pid)
        except Disrupted:
            if visit.pressed_ms:
                visit.cut_after_press = True
            raise
        visit.seq = saved.seq
        visit.kind = saved.kind

    async def _offer_resilient(self, dev, boots: int, visit: Visit) -> str:
        """Wait until the device shows one of this visit's prompts; returns its pid.

        A prompt of an earlier attempt that arrives late (it sat in the broker while the
        device was away) is as good as the newest: the citizen rates whichever is on
        screen. A prompt counts as lost once the device has been online for a while
        without showing it (a hub killed before it published, a broker killed before
        it saved); then the visit is disrupted and tried again."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        mine = set(visit.pids)

        def shown():
            if dev.state in ("PROMPT", "REASONS") and dev.state_pid in mine:
                return dev.state_pid
            if dev.offers.get(visit.pid) in ("busy", "full", "bad"):
                return "refused"
            # Online and settled for a while, and still nothing: lost on the way.
            now = loop.time()
            if dev.connected and now - max(sent, dev.connected_at) > LOST_PROMPT_S:
                return "lost"
            return None

        found = await self._until(dev, boots, shown, self.fault_wait_s, "prompt " + visit.pid)
        if found == "refused":
            # Busy with a prompt that is not ours, or full: wait for rest and ask again.
            visit.offer = dev.offers.get(visit.pid, "")
            raise Disrupted("prompt " + visit.offer)
        if found == "lost":
            raise Disrupted("prompt %s never reached the device" % visit.pid)
        visit.offer = "shown"
        visit.pid = found
        return found

    async def _decide(self, dev, boots: int, visit: Visit, key: int) -> None:
        """The press that makes the record: its time is the vote's latency start."""
        if dev.boots != boots or not dev.alive:
            raise Disrupted("power cut before the deciding press")
        visit.pressed_ms = _wall_ms()
        await self.fleet.press(dev.device_id, key, KEY_GAP_MS)
        if self.on_decide is not None:
            self.on_decide(dev.device_id)

    @staticmethod
    def _saved_for(dev, pid):
        for saved in reversed(list(dev.saved.values())):
            if saved.pid == pid and saved.reported:
                return saved
        return None

    async def _bad_rating(self, dev, boots: int, visit: Visit, rng: random.Random) -> None:
        device_id = dev.device_id
        await self.fleet.press(device_id, visit.stars, KEY_GAP_MS)
        await self._until(dev, boots, lambda: dev.state == "REASONS", self.step_timeout_s,
                          "reasons screen")
        await asyncio.sleep(KEY_GAP_S)
        await self.fleet.press(device_id, KEY_TOGGLE, KEY_GAP_MS)
        if rng.random() < 0.5:
            await asyncio.sleep(KEY_GAP_S)
            await self.fleet.press(device_id, KEY_DOWN, KEY_GAP_MS)
            await asyncio.sleep(KEY_GAP_S)
            await self.fleet.press(device_id, KEY_TOGGLE, KEY_GAP_MS)
        await asyncio.sleep(KEY_GAP_S + rng.uniform(0, 0.3))
        await self._decide(dev, boots, visit, KEY_SUBMIT)
