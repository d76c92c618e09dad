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
import random
import time
from dataclasses import dataclass, field
from typing import Any

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

TASKS = (
    ("11440000MB2C94230X", "44000012345", "居民身份证换领"),
    ("11440000MB2C94230X", "44000012346", "营业执照变更登记"),
    ("11440000MB2C94230X", "44000012347", "社会保障卡补办"),
    ("11440000MB2C94230X", "44000012348", "不动产权证书查询"),
)


class CitizenError(PingjiaError):
    """The hub or a device did not play its part in a visit."""


@dataclass
class Mix:
    """How the citizens behave, as shares of visits (the rest rate 3..5 stars)."""

    bad: float = 0.15  # rate 1..2 stars and choose reasons
    walk_away: float = 0.05  # never press: the prompt times out (unrated)
    misuse: float = 0.1  # press a key while nothing is asked (before the prompt)
    think_s: tuple[float, float] = (0.3, 1.5)
    walk_away_ttl_s: int = 3  # the prompt ttl asked for walk-away visits
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
    pid: str = ""
    offer: str = ""  # the device's answer to the prompt: shown/busy/full/bad
    pressed_ms: int = 0  # host wall clock of the key press that decided the vote
    seq: int = 0  # the device sequence number of the durable record
    kind: str = ""  # "v" or "u" as saved
    misuse_presses: int = 0
    error: str = ""


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

    async def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        url = self.base + path
        try:
            async with self.session.request(method, url, json=body, headers=self.headers,
                                            timeout=aiohttp.ClientTimeout(total=15)) as resp:
                text = await resp.text()
                if resp.status >= 300:
                    raise CitizenError("%s %s: HTTP %d %s" % (method, path, resp.status, text[:200]))
                try:
                    return await resp.json(content_type=None) if text else {}
                except ValueError:
                    raise CitizenError("%s %s: answer is not JSON" % (method, path))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise CitizenError("%s %s: %s" % (method, path, exc.__class__.__name__))

    async def sign_in(self, window: str, staff_no: str, name: str) -> dict:
        return await self._call("POST", "/api/v1/windows/%s/staff" % window,
                                {"staff_no": staff_no, "name": name})

    async def prompt(self, window: str, case_no: str, task: tuple[str, str, str], kind: str = "ji",
                     n: int = 1, ttl: int | None = None) -> str:
        body = {"window": window, "case_no": case_no, "dept_code": task[0], "task_code": task[1],
                "task_name": task[2], "kind": kind, "n": n}
        if ttl:
            body["ttl"] = ttl
        answer = await self._call("POST", "/api/v1/prompts", body)
        pid = answer.get("pid")
        if not isinstance(pid, str):
            raise CitizenError("POST /api/v1/prompts: no pid in the answer")
        return pid


class Citizens:
    """Walks visits through the counters of a fleet, one citizen per window at a time."""

    def __init__(self, fleet: Fleet, hub: HubAPI, rng: random.Random, mix: Mix | None = None,
                 step_timeout_s: float = 30.0):
        self.fleet = fleet
        self.hub = hub
        self.rng = rng
        self.mix = mix or Mix()
        self.step_timeout_s = step_timeout_s
        self.outcome = Outcome()
        self.cases = 0

    def plan(self) -> tuple[str, int]:
        roll = self.rng.random()
        if roll < self.mix.walk_away:
            return "walk_away", 0
        if roll < self.mix.walk_away + self.mix.bad:
            return "bad", self.rng.choice((1, 2))
        return "good", self.rng.choice((3, 4, 5, 5, 5))

    async def serve(self, device_id: str, window: str, visits: int) -> list[Visit]:
        """Serve `visits` citizens at one window in turn; returns their visits."""
        done = []
        for _ in range(visits):
            visit = await self.visit(device_id, window)
            done.append(visit)
        return done

    async def _wait_rest(self, device_id: str) -> None:
        dev = self.fleet.devices[device_id]
        await self.fleet.wait_for(lambda: dev.state == "IDLE" and dev.connected,
                                  self.step_timeout_s + 60, device_id + " idle")

    async def visit(self, device_id: str, window: str) -> Visit:
        self.cases += 1
        plan, stars = self.plan()
        visit = Visit(device_id, window, "SIM-%s-%05d" % (window, self.cases), plan, stars)
        self.outcome.visits.append(visit)
        dev = self.fleet.devices[device_id]
        try:
            await self._wait_rest(device_id)
            if self.rng.random() < self.mix.misuse:
                # Presses while the device asks nothing: counted as misuse, never a vote.
                for _ in range(self.rng.choice((1, 2))):
                    seen = dev.keys_seen
                    await self.fleet.press(device_id, self.rng.randint(1, 5), KEY_GAP_MS)
                    visit.misuse_presses += 1
                    # The press must have happened before any prompt can be on screen.
                    await self.fleet.wait_for(lambda: dev.keys_seen > seen, self.step_timeout_s,
                                              device_id + " misuse press")
                await asyncio.sleep(KEY_GAP_S)
            ttl = self.mix.walk_away_ttl_s if plan == "walk_away" else None
            visit.pid = await self.hub.prompt(window, visit.case_no, self.rng.choice(TASKS), ttl=ttl)
            pid = visit.pid
            await self.fleet.wait_for(lambda: dev.offers.get(pid), self.step_timeout_s,
                                      device_id + " prompt " + pid)
            visit.offer = dev.offers[pid]
            if visit.offer != "shown":
                visit.error = "prompt " + visit.offer
                return visit
            if plan != "walk_away":
                await asyncio.sleep(self.rng.uniform(*self.mix.think_s))
                if plan == "bad":
                    await self._bad_rating(device_id, visit)
                else:
                    visit.pressed_ms = _wall_ms()
                    await self.fleet.press(device_id, stars, KEY_GAP_MS)
            wait = self.step_timeout_s + (max(ttl, self.mix.hub_ttl_s) if ttl else 0)
            saved = await self.fleet.wait_for(lambda: self._saved_for(dev, pid), wait,
                                              device_id + " durable record for " + pid)
            visit.seq = saved.seq
            visit.kind = saved.kind
        except (FleetError, CitizenError) as exc:
            visit.error = str(exc)
        return visit

    @staticmethod
    def _saved_for(dev, pid):
        for saved in reversed(list(dev.saved.values())):
            if saved.pid == pid:
                return saved
        return None

    async def _bad_rating(self, device_id: str, visit: Visit) -> None:
        dev = self.fleet.devices[device_id]
        await self.fleet.press(device_id, visit.stars, KEY_GAP_MS)
        await self.fleet.wait_for(lambda: dev.state == "REASONS", self.step_timeout_s,
                                  device_id + " reasons screen")
        await asyncio.sleep(KEY_GAP_S)
        await self.fleet.press(device_id, KEY_TOGGLE, KEY_GAP_MS)
        if self.rng.random() < 0.5:
            await asyncio.sleep(KEY_GAP_S)
            await self.fleet.press(device_id, KEY_DOWN, KEY_GAP_MS)
            await asyncio.sleep(KEY_GAP_S)
            await self.fleet.press(device_id, KEY_TOGGLE, KEY_GAP_MS)
        await asyncio.sleep(KEY_GAP_S + self.rng.uniform(0, 0.3))
        visit.pressed_ms = _wall_ms()
        await self.fleet.press(device_id, KEY_SUBMIT, KEY_GAP_MS)
