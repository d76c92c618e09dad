# The dashboard in a real headless Chromium (Debian's, driven by Playwright) against the
# real hub (supervised mosquitto with per-device logins, ingest, HTTP) and simulated counter
# evaluators running the real firmware under MicroPython. A hall manager logs in, watches
# votes appear without reloading the page, acknowledges a bad rating (recorded with who and
# when), and sees a window's device turn offline when its process is killed (its last will).
#
# Screenshots are taken on every run; with PINGJIA_DOC_SHOTS=1 they are written to
# docs/dashboard/ (the pictures in docs/dashboard.md), otherwise to a temporary folder.
import asyncio
import os
import shutil
import socket
import sqlite3
import struct

import aiohttp
import pytest

from hub.dashboard import add_manager
from hub.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Debian's chromium package; Playwright never downloads a browser of its own here.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
WINDOWS = {"D001": ("W001", "10234", "王芳"), "D002": ("W002", "10235", "李娜"),
           "D003": ("W003", "10236", "赵敏")}
TASKS = {"W001": ("44000012345", "居民身份证换领"), "W002": ("44000012346", "营业执照变更登记"),
         "W003": ("44000012347", "社会保障卡补办")}
KEY_GAP_MS = 350  # a person's pace between deliberate presses (simulator/citizens.py)



def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_hub(tmp_path):
    from hub.app import Hub
    from hub.broker import write_broker_files
    from hub.keys import ensure_signing_key
    from hub.provision import add_device, device_config
    from hub.settings import write_default

    from simulator.province import ProvinceStore, ThreadedReceiver

    province_port = free_port()
    settings = write_default(str(tmp_path / "hub" / "hub.toml"), hub={"id": "futian-hall"},
                             broker={"port": free_port()}, http={"port": free_port()},
                             province={"endpoint": "http://127.0.0.1:%d/api/v1" % province_port,
                                       "batch_interval_ms": 100})
    key = ensure_signing_key(settings.signing_key_path)
    write_broker_files(settings)
    # The reference provincial receiver, so the page shows a working link to the province.
    province_store = ProvinceStore(str(tmp_path / "province.db"))
    province = ThreadedReceiver(province_store, [key.public_key()], port=province_port).start()
    configs = {}
    for device_id, (window, _, _) in WINDOWS.items():
        configs[device_id] = device_config(add_device(settings, device_id, window=window))
    store = Store(settings.db_path)
    add_manager(store, "zhang", "hall-manager-1", settings.hub.id, "张主任")
    store.close()
    hub = Hub(settings)
    try:
        hub.start()
        yield settings, configs
    finally:
        hub.stop()
        province.stop()
        province_store.close()


def shots_dir(tmp_path):
    if os.environ.get("PINGJIA_DOC_SHOTS") == "1":
        path = os.path.join(ROOT, "docs", "dashboard")
    else:
        path = str(tmp_path / "shots")
    os.makedirs(path, exist_ok=True)
    return path


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


class Counter:
    """The window's business system and the citizens in front of the devices."""

    def __init__(self, fleet, http, base):
        self.fleet = fleet
        self.http = http
        self.base = base
        self.cases = 0

    async def sign_in(self, window, staff_no, name):
        async with self.http.post("%s/api/v1/windows/%s/staff" % (self.base, window),
                                  json={"staff_no": staff_no, "name": name}) as resp:
            assert resp.status == 200, await resp.text()

    async def serve(self, device_id, *presses):
        """A service is done at the device's window, then the citizen presses keys.
        Returns the durable record's sequence number."""
        window = WINDOWS[device_id][0]
        dev = self.fleet.devices[device_id]
        await self.fleet.wait_for(lambda: dev.state == "IDLE", 30, device_id + " idle")
        self.cases += 1
        body = {"window": window, "case_no": "GD2026-%04d" % self.cases,
                "task_code": TASKS[window][0], "task_name": TASKS[window][1]}
        async with self.http.post(self.base + "/api/v1/prompts", json=body) as resp:
            answer = await resp.json()
            assert resp.status in (200, 201), answer
        pid = answer["pid"]
        await self.fleet.wait_for(lambda: dev.offers.get(pid) == "shown", 30, "prompt " + pid)
        for stars in presses:
            await self.fleet.press(device_id, stars, KEY_GAP_MS)
            if presses[0] <= 2 and stars == presses[0]:
                await self.fleet.wait_for(lambda: dev.state == "REASONS", 30, "reasons")
        saved = await self.fleet.wait_for(
            lambda: [s for s in dev.saved.values() if s.pid == pid], 30, "vote " + pid)
        return saved[0].seq


def test_a_manager_watches_the_hall_live_in_chromium(live_hub, tmp_path):
    from playwright.async_api import async_playwright

    if CHROMIUM is None:
        pytest.fail("chromium is not installed: run `make test`, which installs it")

    from simulator.fleet import Fleet

    settings, configs = live_hub
    base = "http://127.0.0.1:%d" % settings.http.port
    shots = shots_dir(tmp_path)

    async def main():
        fleet = Fleet(str(tmp_path / "devices"))
        await fleet.start()
        try:
            for device_id, config in configs.items():
                fleet.add(device_id, config)
            for device_id in configs:
                await fleet.spawn(device_id)
            await fleet.wait_for(lambda: all(d.connected for d in fleet.devices.values()), 60,
                                 "devices connected")
            async with aiohttp.ClientSession() as http:
                counter = Counter(fleet, http, base)
                for window, staff_no, name in WINDOWS.values():
                    await counter.sign_in(window, staff_no, name)
                async with async_playwright() as pw:
                    browser = await pw.chromium.launch(executable_path=CHROMIUM,
                                                       args=CHROMIUM_ARGS)
                    try:
                        await in_browser(browser, fleet, counter)
                    finally:
                        await browser.close()
        except BaseException:
            for device_id in fleet.devices:
                print(device_id, fleet.log_tail(device_id, 10))
            raise
        finally:
            await fleet.close()

    async def in_browser(browser, fleet, counter):
        context = await browser.new_context(viewport={"width": 1280, "height": 900},
                                            locale="zh-CN", timezone_id="Asia/Shanghai")
        page = await context.new_page()
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(base + "/dashboard/")
        await page.wait_for_selector("#login-form")
        await page.fill("#login-form input[name=name]", "zhang")
        await page.fill("#login-form input[name=password]", "not-the-password")
        await page.click("#login-form button")
        await page.wait_for_selector("#login-error:has-text('账号或密码错误')")
        await page.fill("#login-form input[name=password]", "hall-manager-1")
        await page.click("#login-form button")
        await page.wait_for_selector("#live.on")
        assert await page.text_content("#who") == "张主任"
        for window in ("W001", "W002", "W003"):
            await page.wait_for_selector('[data-window="%s"][data-state="online"]' % window)
        # From here on, everything must arrive without the page ever loading again.
        await page.evaluate("window.__sameDocument = 'never reloaded'")

        seq = await counter.serve("D001", 5)
        row = page.locator('#feed [data-vote="D001:%d"]' % seq)
        await row.wait_for(timeout=15000)
        assert "非常满意" in await row.text_content()
        await page.wait_for_selector('[data-window="W001"]:has-text("今日 1 评")')
        await asyncio.gather(counter.serve("D003", 4), counter.serve("D001", 3))

        # A bad rating with two reasons: 1 star, then 选择 (3), 下 (4), 选择 (3), 提交 (1).
        bad = await counter.serve("D002", 1, 3, 4, 3, 1)
        card = page.locator('#alerts-open .alert[data-kind="bad_rating"]')
        await card.wait_for(timeout=15000)
        assert await card.count() == 1
        text = await card.text_content()
        for expected in ("窗口 W002", "李娜", "10235", "营业执照变更登记", "非常不满意"):
            assert expected in text, (expected, text)
        reasons = await card.locator(".reasons span").all_text_contents()
        assert len(reasons) == 2 and all(reasons), reasons
        await page.wait_for_selector('#feed li.bad[data-vote="D002:%d"]' % bad)
        await page.wait_for_selector("#alerts-count:has-text('1')")
        await page.wait_for_timeout(3500)  # let the charts catch up (refreshed every 3 s)
        await page.screenshot(path=os.path.join(shots, "hall.png"), full_page=True)

        # The manager acknowledges it: the card leaves the open list and says who and when.
        alert_id = await card.get_attribute("data-alert-id")
        await card.locator("button.ack").click()
        done = page.locator('#alerts-done .alert[data-alert-id="%s"] .acked' % alert_id)
        await done.wait_for(state="attached")
        assert (await done.get_attribute("data-acked-by")) == "zhang"
        assert await page.locator("#alerts-open .alert[data-kind=bad_rating]").count() == 0
        conn = sqlite3.connect(settings.db_path)
        try:
            acked_by, acked_at, ref = conn.execute(
                "SELECT acked_by, acked_at, ref FROM alerts WHERE id = ?",
                (int(alert_id),)).fetchone()
        finally:
            conn.close()
        assert (acked_by, ref) == ("zhang", "D002:%d" % bad) and acked_at

        # Power cut at W003: its device's last will turns it offline on the page.
        await fleet.kill("D003")
        await page.wait_for_selector('[data-window="W003"][data-state="offline"]',
                                     timeout=20000)
        offline = page.locator('#alerts-open .alert[data-kind="offline"]')
        await offline.wait_for(timeout=10000)
        assert "W003" in await offline.text_content()
        await page.screenshot(path=os.path.join(shots, "offline.png"), full_page=True)

        assert await page.evaluate("window.__sameDocument") == "never reloaded"

        await page.click('.links a[href="#/devices"]')
        await page.wait_for_selector('#devices-table tr[data-device="D003"][data-state="offline"]')
        await page.wait_for_selector('#system:has-text("待上报省平台")')
        # Every vote made so far reached the province (the reference receiver).
        await page.wait_for_selector('#system tr:has-text("已存评价") td:has-text("4 / 4")',
                                     timeout=20000)
        await page.screenshot(path=os.path.join(shots, "devices.png"), full_page=True)
        await page.go_back()
        await page.wait_for_selector('[data-window="W003"][data-state="offline"]')

        await page.click('[data-window="W003"] a[href="#/device/D003"]')
        await page.wait_for_selector('#device-panel [data-state="offline"]')
        events = await page.locator("#device-panel .events li").all_text_contents()
        assert any("离线" in e for e in events) and any("启动" in e for e in events), events
        await page.screenshot(path=os.path.join(shots, "device.png"), full_page=True)
        assert errors == []
        await context.close()

        # The same hall on a phone.
        phone = await browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                                          has_touch=True, device_scale_factor=2, locale="zh-CN",
                                          timezone_id="Asia/Shanghai")
        page = await phone.new_page()
        await page.goto(base + "/dashboard/")
        await page.fill("#login-form input[name=name]", "zhang")
        await page.fill("#login-form input[name=password]", "hall-manager-1")
        await page.click("#login-form button")
        await page.wait_for_selector("#live.on")
        await page.wait_for_selector('[data-window="W003"][data-state="offline"]')
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, "the page scrolls sideways on a phone (%d px)" % width
        await page.screenshot(path=os.path.join(shots, "phone.png"), full_page=False)
        await phone.close()

    asyncio.run(main())
    for name in ("hall.png", "offline.png", "devices.png", "device.png", "phone.png"):
        w, h = png_size(os.path.join(shots, name))
        assert w >= 390 and h >= 600, (name, w, h)
