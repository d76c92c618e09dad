"""`pingjia hub release …` and `pingjia hub updates …`: firmware releases and rollouts.

A thin layer over hub/updates.py. Every command only reads or writes the hub's store; the
running hub's rollout engine sees a change within about a second, and a rollout started
while the hub is down begins when it starts.
"""
import json

import click

from hub.cli_run import config_option


def _store(config):
    from hub.settings import Settings
    from hub.store import Store

    settings = Settings.load(config)
    return settings, Store(settings.db_path)


def _with_store(config, call):
    """call(settings, store) on the hub's store, closed afterwards; returns its result."""
    settings, store = _store(config)
    try:
        return call(settings, store)
    finally:
        store.close()


def _echo_json(obj):
    click.echo(json.dumps(obj, ensure_ascii=False, sort_keys=True))


json_option = click.option("--json", "as_json", is_flag=True, help="One JSON object.")


# -- releases ---------------------------------------------------------------------------------

@click.group()
def release():
    """Firmware releases (ROMFS images) the hub can roll out."""


@release.command("add")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--version", "version", required=True, help="The firmware version inside, "
              "e.g. 0.2.0 (what the device reports as fw).")
@click.option("--board", required=True, help="The board it is built for, e.g. sim-v1.")
@click.option("--notes", default="", help="What changed, for the technician.")
@config_option
@json_option
def release_add(image, version, board, notes, config, as_json):
    """Store IMAGE as release VERSION for BOARD (sha256 and size are computed)."""
    from hub import updates

    with open(image, "rb") as f:
        data = f.read()
    made = _with_store(config, lambda _, store: updates.add_release(store, data, version,
                                                                      board, notes))
    if as_json:
        _echo_json(made)
        return
    click.echo("release %s for %s: %d bytes, sha256 %s" % (made["version"], made["board"],
                                                          made["size"], made["sha256"]))


@release.command("list")
@config_option
@json_option
def release_list(config, as_json):
    """Every release with its size and sha256."""
    from hub import updates

    found = _with_store(config, lambda _, store: updates.releases(store))
    if as_json:
        _echo_json({"releases": found})
        return
    if not found:
        click.echo("no releases (add one with `pingjia hub release add`)")
        return
    for r in found:
        click.echo("%-12s %-14s %8d bytes  sha256 %s  %s%s" % (
            r["version"], r["board"], r["size"], r["sha256"], r["created_at"],
            "  " + r["notes"] if r["notes"] else ""))


# -- rollouts ---------------------------------------------------------------------------------

def _count_words(counts):
    order = ("done", "skipped", "failed", "installing", "downloading", "offered", "pending",
             "withdrawn")
    return ", ".join("%s %d" % (s, counts[s]) for s in order if counts.get(s))


def _rollout_line(r):
    why = " (%s)" % r["why"] if r["why"] else ""
    return "%-5s %-10s %-12s %-9s %-6s %s%s" % (
        r["rid"], r["version"], r["board"], r["state"], r["stage"],
        _count_words(r["counts"]) or "no devices yet", why)


@click.group(invoke_without_command=True)
@config_option
@json_option
@click.pass_context
def updates(ctx, config, as_json):
    """Rollouts of firmware releases: without a command, the list (as `updates list`)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(updates_list, config=config, as_json=as_json)
        return
    # `updates --config x show R1` means what `updates show R1 --config x` does.
    if ctx.get_parameter_source("config") != click.core.ParameterSource.DEFAULT:
        ctx.default_map = {name: {"config": config} for name in ctx.command.commands}


@updates.command("list")
@config_option
@json_option
def updates_list(config, as_json):
    """Every rollout, newest first, with its stage and device counts."""
    from hub import updates as lib

    found = _with_store(config, lambda _, store: lib.rollouts(store))
    if as_json:
        _echo_json({"rollouts": found})
        return
    if not found:
        click.echo("no rollouts (start one with `pingjia hub updates start VERSION`)")
        return
    for r in found:
        click.echo(_rollout_line(r))


@updates.command("start")
@click.argument("version")
@click.option("--board", default=None, help="Needed when VERSION exists for several boards.")
@click.option("--canary", default=2, show_default=True, type=int,
              help="Devices updated first; the rest wait until they all finished.")
@click.option("--batch", default=20, show_default=True, type=int,
              help="At most this many devices updating at a time after the canaries.")
@click.option("--max-failures", default=0, show_default=True, type=int,
              help="More failed devices than this halt the rollout.")
@config_option
@json_option
def updates_start(version, board, canary, batch, max_failures, config, as_json):
    """Roll release VERSION out to every device of its board, canaries first."""
    from hub import updates as lib

    made = _with_store(config, lambda _, store: lib.start_rollout(
        store, version, board, canary=canary, batch=batch, max_failures=max_failures))
    if as_json:
        made.pop("device_list", None)
        _echo_json(made)
        return
    click.echo("rollout %s: %s for %s, %d canaries then batches of %d, halts after %d "
               "failure(s)" % (made["rid"], made["version"], made["board"], made["canary"],
                               made["batch"], made["max_failures"]))


@updates.command("show")
@click.argument("rid")
@config_option
@json_option
def updates_show(rid, config, as_json):
    """One rollout: every device's state, download progress and failure reason."""
    from hub import updates as lib

    found = _with_store(config, lambda settings, store: lib.rollout(
        store, rid, offline_after_s=settings.dashboard.offline_after_s))
    if as_json:
        _echo_json(found)
        return
    click.echo(_rollout_line(found))
    click.echo("release %s for %s: %d bytes, sha256 %s" % (
        found["version"], found["board"], found["size"], found["sha256"]))
    for d in found["device_list"]:
        detail = ""
        if d["state"] == "downloading" and d["off"] is not None:
            detail = "%d/%d bytes (%d%%)" % (d["off"], d["size"], int(100 * d["progress"]))
        if d["why"]:
            detail = (detail + " " if detail else "") + d["why"]
        click.echo("  %-10s %-6s %-8s %-12s %-7s fw %-10s %s" % (
            d["device_id"], d["window"] or "-", "canary" if d["canary"] else "",
            d["state"], "online" if d["online"] else "offline", d["fw"] or "?", detail))


def _change(name, func_name, doc):
    @click.command(name)
    @click.argument("rid")
    @config_option
    @json_option
    def command(rid, config, as_json):
        from hub import updates as lib

        found = _with_store(config, lambda _, store: getattr(lib, func_name)(store, rid))
        if as_json:
            found.pop("device_list", None)
            _echo_json(found)
            return
        click.echo(_rollout_line(found))
    command.__doc__ = doc
    command.help = doc
    return command


updates.add_command(_change("pause", "pause", "Offer no more devices (those updating go on)."))
updates.add_command(_change("resume", "resume", "Go on with a paused rollout."))
updates.add_command(_change("cancel", "cancel", "End a rollout: offers not yet installed are "
                                                "withdrawn."))


def register(group):
    """Add `release` and `updates` to the `pingjia hub` group."""
    group.add_command(release)
    group.add_command(updates)
