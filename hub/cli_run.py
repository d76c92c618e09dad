"""`pingjia hub run` and `pingjia hub status`: a thin layer over hub/app.py and the store."""
import json
import logging
import os

import click

DEFAULT_CONFIG = "hub.toml"

config_option = click.option(
    "--config", "-c", "config", default=DEFAULT_CONFIG, show_default=True,
    envvar="PINGJIA_CONFIG", type=click.Path(dir_okay=False),
    help="The hub's settings file (env PINGJIA_CONFIG).")


@click.command()
@config_option
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def run(config, log_level):
    """Run the hub (broker, ingest, forwarder, HTTP API) until Ctrl-C or SIGTERM."""
    from hub.app import Hub
    from hub.settings import Settings

    settings = Settings.load(config)
    logging.basicConfig(level=getattr(logging, log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Hub(settings).run_until_signal()


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def status(config, as_json):
    """Backlogs, province link, rejections and devices, read from the hub's store.

    Works while the hub runs (it only reads the SQLite file) and when it does not."""
    from hub import PingjiaError
    from hub.http_api import status_json
    from hub.settings import Settings
    from hub.store import Store

    settings = Settings.load(config)
    if not os.path.exists(settings.db_path):
        raise PingjiaError("%s: no hub store yet (has the hub run?)" % settings.db_path)
    store = Store(settings.db_path)
    try:
        report = status_json(store, settings.hub.id)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, sort_keys=True))
        return
    click.echo(_human(report))


def _human(report):
    backlog, province, devices = report["backlog"], report["province"], report["devices"]
    lines = [
        "hub %s at %s" % (report["hub"], report["at"]),
        "devices: %d active (%d online), %d retired" % (devices["active"], devices["online"],
                                                        devices["retired"]),
        "votes: %d stored, %d forwarded" % (report["votes"]["stored"],
                                           report["votes"]["forwarded"]),
        "backlog: %d unacked, %d unforwarded (%d not yet in a batch), %d unaccepted batches"
        % (backlog["unacked"], backlog["unforwarded"], backlog["unbatched"],
           backlog["unaccepted_batches"]),
        "province: last success %s, last batch %d" % (province["last_success"] or "never",
                                                     province["last_batch"]),
    ]
    if province["pending_batch"]:
        lines.append("  pending %s after %d attempts: %s" % (
            province["pending_batch"], province["pending_attempts"],
            province["last_error"] or "not sent yet"))
    if province["chain_error"]:
        lines.append("  CHAIN ERROR at %s: the province does not accept our chain; no new "
                     "batches are built until it is resolved" % province["chain_error"]["batch_id"])
    if province["refused_records"] or province["held_records"]:
        lines.append("  %d records refused by the province, %d held back as unmappable"
                     % (province["refused_records"], province["held_records"]))
    if report["rejections"]:
        lines.append("rejections: " + ", ".join("%s %d" % kv for kv in
                                                sorted(report["rejections"].items())))
    else:
        lines.append("rejections: none")
    if report["gap_events"]:
        lines.append("sequence gaps: %d (votes lost on a device: %d)"
                     % (report["gap_events"], report["counters"].get("gap_seqs", 0)))
    return "\n".join(lines)


def register(group):
    """Add `run` and `status` to the `pingjia hub` group."""
    group.add_command(run)
    group.add_command(status)
