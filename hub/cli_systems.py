"""`pingjia hub systems …` (business systems and their tokens) and `pingjia hub jurisdiction …`.

Thin over hub/business.py and hub/policy.py; they work on the hub's store whether or not the
hub runs (a running hub sees a new token or jurisdiction at once). A token is printed once,
when it is made: the store keeps only its SHA-256.
"""
import json

import click

from hub import business, policy
from hub.cli_admin import config_option, load_settings
from hub.store import Store


def _store(config_path):
    return Store(load_settings(config_path).db_path)


def _echo_json(obj):
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


@click.group("systems")
def systems():
    """Business systems (queue and case systems) allowed to use the HTTP API."""


@systems.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(business.ROLES), default="business", show_default=True,
              help="manager may also read suspicious-vote flags and every system's cases.")
@click.option("--window", "windows", multiple=True,
              help="Limit the system to this window (repeat for more); default: every window.")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def systems_add(name, role, windows, config_path, as_json):
    """Register a system and print its bearer token (shown this once only)."""
    store = _store(config_path)
    try:
        token = business.add_system(store, name, role, windows)
    except business.SystemError_ as exc:
        raise click.ClickException(str(exc))
    finally:
        store.close()
    if as_json:
        _echo_json({"name": name, "role": role, "windows": list(windows), "token": token})
        return
    click.echo("system %s (%s%s) registered. Its token, shown only now:"
               % (name, role, ", windows " + ", ".join(windows) if windows else ""))
    click.echo(token)
    click.echo("Send it as: Authorization: Bearer <token>")


@systems.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def systems_list(config_path, as_json):
    """Registered systems (never their tokens)."""
    store = _store(config_path)
    try:
        rows = business.list_systems(store)
    finally:
        store.close()
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo("no business systems: loopback callers need no token until one is added")
    for row in rows:
        click.echo("%-20s %-8s %-24s %s" % (
            row["name"], row["role"], ",".join(row["windows"]) or "every window",
            "revoked " + row["revoked_at"] if row["revoked_at"] else "active"))


@systems.command("remove")
@click.argument("name")
@config_option
def systems_remove(name, config_path):
    """Revoke a system's token at once (its cases and callbacks stay)."""
    store = _store(config_path)
    try:
        business.remove_system(store, name)
    except business.SystemError_ as exc:
        raise click.ClickException(str(exc))
    finally:
        store.close()
    click.echo("system %s revoked" % name)


@click.group("jurisdiction")
def jurisdiction():
    """The counter rules in force: default rating, deadlines, indicator catalogue."""


@jurisdiction.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def jurisdiction_list(as_json):
    """The shipped jurisdiction profiles."""
    rows = []
    for name, j in policy.load_all().items():
        rows.append({"name": name, "title": j.title, "catalogue": j.cv,
                     "default_rating": j.default_stars, "applied_by": j.default_applied_by})
    if as_json:
        _echo_json(rows)
        return
    for row in rows:
        default = "%d stars by the %s" % (row["default_rating"], row["applied_by"]) \
            if row["default_rating"] else "no default rating"
        click.echo("%-10s %-16s %-11s %s" % (row["name"], row["title"], row["catalogue"],
                                             default))


@jurisdiction.command("show")
@config_option
@click.option("--json", "as_json", is_flag=True, help="The whole profile as JSON.")
def jurisdiction_show(config_path, as_json):
    """The jurisdiction this hub applies."""
    settings = load_settings(config_path)
    store = Store(settings.db_path)
    try:
        j = policy.current(store, settings.province.profile)
    finally:
        store.close()
    if as_json:
        _echo_json(j.raw)
        return
    click.echo("%s (%s), catalogue %s with %d indicators" % (j.name, j.title, j.cv,
                                                             len(j.reasons)))


@jurisdiction.command("set")
@click.argument("name")
@config_option
def jurisdiction_set(name, config_path):
    """Apply another jurisdiction; a running hub sends its catalogue to every device."""
    store = _store(config_path)
    try:
        j = policy.choose(store, name)
    finally:
        store.close()
    click.echo("jurisdiction %s (%s), catalogue %s" % (j.name, j.title, j.cv))


def register(group):
    """Add `systems` and `jurisdiction` to the `pingjia hub` group."""
    group.add_command(systems)
    group.add_command(jurisdiction)
