"""`pingjia hub devices`, `pingjia hub device ID` and `pingjia hub managers …`.

A thin layer over hub/health.py and hub/dashboard.py. The device commands only read the
hub's SQLite store, so they work whether the hub runs or not; a device the hub has not
heard from within `dashboard.offline_after_s` shows as offline either way.
"""
import json
import os
import sys
import time

import click

from hub.cli_run import config_option


def _open_store(config, must_exist=True):
    from hub import PingjiaError
    from hub.settings import Settings
    from hub.store import Store

    settings = Settings.load(config)
    if must_exist and not os.path.exists(settings.db_path):
        raise PingjiaError("%s: no hub store yet (has the hub run?)" % settings.db_path)
    return settings, Store(settings.db_path)


def _limits(settings):
    from hub.health import Limits
    return Limits(offline_after_s=settings.dashboard.offline_after_s)


def _ago(iso_text, now):
    from hub.health import parse_iso

    t = parse_iso(iso_text)
    if t is None:
        return "never"
    seconds = max(0, int(now - t))
    if seconds < 120:
        return "%d s ago" % seconds
    if seconds < 7200:
        return "%d min ago" % (seconds // 60)
    if seconds < 172800:
        return "%d h ago" % (seconds // 3600)
    return "%d days ago" % (seconds // 86400)


def _reason_words(report):
    words = []
    for reason in report["reasons"]:
        detail = report["reason_detail"].get(reason) or {}
        if reason == "stuck_key":
            words.append("stuck key %s" % ",".join(str(k) for k in detail.get("keys", [])))
        elif reason == "backlog":
            words.append("backlog %s (oldest %s s)" % (detail.get("jd"), detail.get("old")))
        elif reason == "low_memory":
            words.append("low memory (%s bytes free)" % detail.get("heap"))
        elif reason == "clock_drift":
            words.append("clock drift (%+d s)" % detail.get("clk", 0))
        elif reason == "resets":
            words.append("repeated resets (%s in 1 h)" % detail.get("boots"))
        elif reason == "misuse":
            words.append("misuse spike (%s presses)" % detail.get("presses"))
        elif reason == "weak_signal":
            words.append("weak signal (%s dBm)" % detail.get("rssi"))
        else:
            words.append(reason.replace("_", " "))
    return words


def _state_words(report, now):
    if report["state"] == "offline":
        why = "no will, silent" if report.get("cause") == "silent" else "will"
        return "offline since %s (%s)" % (report["since"] or "?", why)
    if report["state"] == "degraded":
        return "degraded: " + "; ".join(_reason_words(report))
    return report["state"]


@click.command()
@config_option
@click.option("--all", "include_retired", is_flag=True, help="Retired devices too.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def devices(config, include_retired, as_json):
    """Every device with its state: online, degraded (and why), offline (since when)."""
    from hub import health

    settings, store = _open_store(config)
    now = time.time()
    try:
        rows = store.conn.execute("SELECT device_id, retired FROM devices ORDER BY device_id")
        reports = []
        for device_id, retired in rows.fetchall():
            if retired and not include_retired:
                continue
            report = health.report(store, device_id, now, _limits(settings), history=False)
            reports.append(report)
    finally:
        store.close()
    if as_json:
        counts = {s: sum(1 for r in reports if r["state"] == s and not r["retired"])
                  for s in health.STATES}
        click.echo(json.dumps({"hub": settings.hub.id, "at": now, "counts": counts,
                               "devices": reports}, ensure_ascii=False, sort_keys=True))
        return
    if not reports:
        click.echo("no devices (add one with `pingjia device add`)")
        return
    width = max(len(r["device_id"]) for r in reports)
    wwidth = max([len(r["window"]) for r in reports] + [6])
    for r in reports:
        fields = r["fields"] or {}
        state = "retired" if r["retired"] else _state_words(r, now)
        click.echo("%-*s  %-*s  %-10s  %-14s  %s" % (
            width, r["device_id"], wwidth, r["window"] or "-", fields.get("fw") or "-",
            _ago(r["last_seen"], now), state))


@click.command()
@config_option
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def device(config, device_id, as_json):
    """One device: state, what it last reported, and its recent events."""
    from hub import PingjiaError, health

    settings, store = _open_store(config)
    now = time.time()
    try:
        report = health.report(store, device_id, now, _limits(settings))
    finally:
        store.close()
    if report is None:
        raise PingjiaError("device %s: not registered on this hub" % device_id)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, sort_keys=True))
        return
    f = report["fields"] or {}
    lines = [
        "device %s%s" % (device_id, " (retired)" if report["retired"] else ""),
        "window: %s" % (report["window"] or "-"),
        "state: %s" % _state_words(report, now),
        "last seen: %s (%s)" % (report["last_seen"] or "never", _ago(report["last_seen"], now)),
    ]
    if f:
        lines += [
            "firmware %s on %s, up %s s, last reset: %s" % (f.get("fw"), f.get("board"),
                                                           f.get("up"), f.get("rst")),
            "journal: %s unacked, oldest %s s; free heap %s bytes" % (f.get("jd"), f.get("old"),
                                                                     f.get("heap")),
            "reconnects %s, rssi %s dBm, stuck keys %s, display %s, misuse %s, clock %s s" % (
                f.get("rc"), f.get("rssi"), ",".join(str(k) for k in f.get("stuck") or [])
                or "none", "fault" if f.get("disp") == 1 else "ok", f.get("mis"), f.get("clk")),
        ]
    if report["samples"]:
        lines.append("samples: %d (last at %s)" % (len(report["samples"]),
                                                   report["samples"][-1]["at"]))
    lines.append("events:")
    for event in report["events"][:20]:
        detail = event["detail"]
        lines.append("  %s  %-10s %s" % (event["at"], event["kind"],
                                         json.dumps(detail, ensure_ascii=False, sort_keys=True)
                                         if detail else ""))
    if not report["events"]:
        lines.append("  none")
    click.echo("\n".join(lines))


@click.group()
def managers():
    """Hall manager logins for the dashboard."""


@managers.command("add")
@config_option
@click.argument("name")
@click.option("--hall", default=None,
              help="The hall this manager sees (default: the whole hub, hub.id).")
@click.option("--display-name", default=None, help="Shown on the dashboard, e.g. 张主任.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--replace", is_flag=True, help="Set a new password for an existing manager.")
def managers_add(config, name, hall, display_name, password_stdin, replace):
    """Create a manager login (the password is asked for twice, never echoed)."""
    from hub import PingjiaError
    from hub.dashboard import Halls, add_manager

    settings, store = _open_store(config, must_exist=False)
    try:
        halls = Halls(settings.hub.id, settings.dashboard.halls)
        hall = hall or settings.hub.id
        if not halls.known(hall):
            raise PingjiaError("hall %s: not this hub's (%s)" % (hall, ", ".join(halls.names())))
        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = click.prompt("password", hide_input=True, confirmation_prompt=True)
        made = add_manager(store, name, password, hall, display_name, replace=replace)
    finally:
        store.close()
    click.echo("manager %s can log in at /dashboard/ (hall %s)" % (made["name"], made["hall"]))


@managers.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def managers_list(config, as_json):
    """Manager logins and their halls."""
    from hub.dashboard import list_managers

    _, store = _open_store(config)
    try:
        rows = list_managers(store)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, sort_keys=True))
        return
    for row in rows:
        click.echo("%s  hall %s%s" % (row["name"], row["hall"],
                                      "  (disabled)" if row["disabled"] else ""))
    if not rows:
        click.echo("no managers (add one with `pingjia hub managers add NAME`)")


@managers.command("remove")
@config_option
@click.argument("name")
def managers_remove(config, name):
    """Disable a manager login and end its sessions (its acknowledgements stay)."""
    from hub.dashboard import remove_manager

    _, store = _open_store(config)
    try:
        remove_manager(store, name)
    finally:
        store.close()
    click.echo("manager %s disabled" % name)


def register(group):
    """Add the device-health and manager commands to the `pingjia hub` group."""
    group.add_command(devices)
    group.add_command(device)
    group.add_command(managers)
