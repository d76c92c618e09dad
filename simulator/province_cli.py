"""`pingjia province serve | stats | verify`: a thin layer over simulator/province.py."""
import json
import sys
import urllib.error
import urllib.request

import click

DEFAULT_DB = "var/province.db"
DEFAULT_URL = "http://127.0.0.1:9100"


def _trusted(trust, trust_dir):
    from simulator.province import TrustedKeys

    return TrustedKeys.from_files(trust, trust_dir)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=9100, show_default=True, type=click.IntRange(1, 65535))
@click.option("--db", "db_path", default=DEFAULT_DB, show_default=True,
              type=click.Path(dir_okay=False), help="The receiver's SQLite store.")
@click.option("--trust", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="PEM of a hub public key to trust (repeatable).")
@click.option("--trust-dir", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Folder whose *.pem hub keys are trusted, re-read when an unknown key signs.")
@click.option("--profile", "profile_paths", multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="A profile JSON file to speak besides the shipped ones (repeatable).")
@click.option("--clients", "clients_path", type=click.Path(exists=True, dir_okay=False),
              help="Hub credentials JSON; without it requests are not authenticated.")
@click.option("--faults", is_flag=True, help="Enable fault injection at /_control/faults.")
def serve(host, port, db_path, trust, trust_dir, profile_paths, clients_path, faults):
    """Run the reference provincial receiver until Ctrl-C."""
    from simulator import province

    if not trust and not trust_dir:
        raise click.UsageError("no hub key to trust: give --trust PEM or --trust-dir DIR")
    trusted = _trusted(trust, trust_dir)
    profiles = province.Profiles.load(profile_paths)
    clients = province.Clients.from_file(clients_path) if clients_path else None
    store = province.ProvinceStore(db_path)
    try:
        province.serve(store, trusted, host=host, port=port, faults=faults,
                       print_fn=lambda line: click.echo(line, err=True), profiles=profiles,
                       clients=clients)
    finally:
        store.close()


@click.command()
@click.option("--url", default=DEFAULT_URL, show_default=True, help="The receiver's base URL.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def stats(url, as_json):
    """What the receiver holds: batches, votes, duplicates, chain errors."""
    from simulator.province import ProvinceError

    target = url.rstrip("/") + "/api/v1/stats"
    try:
        with urllib.request.urlopen(target, timeout=10) as response:
            result = json.loads(response.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ProvinceError("%s: %s" % (target, getattr(exc, "reason", exc))) from None
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
        return
    for key, value in result.items():
        if key == "last_n":
            for hub, n in sorted(value.items()):
                click.echo("last batch of %-14s %d" % (hub + ":", n))
        else:
            click.echo("%-22s %s" % (key + ":", value))


@click.command()
@click.option("--db", "db_path", default=DEFAULT_DB, show_default=True,
              type=click.Path(exists=True, dir_okay=False), help="The receiver's SQLite store.")
@click.option("--trust", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Check signatures with this hub key instead of the keys the store recorded.")
@click.option("--trust-dir", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Check signatures with the *.pem keys in this folder.")
@click.option("--profile", "profile_paths", multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="Read records with the shipped profiles and this file instead of the "
                   "profiles the store recorded (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def verify(db_path, trust, trust_dir, profile_paths, as_json):
    """Re-check every stored batch: signature, chain links, gaps; exit 1 when anything is wrong."""
    from simulator import province

    trusted = _trusted(trust, trust_dir) if (trust or trust_dir) else None
    profiles = province.Profiles.load(profile_paths) if profile_paths else None
    store = province.ProvinceStore(db_path)
    try:
        report = province.verify_store(store, trusted, profiles)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False))
    else:
        for item in report["problems"]:
            name = item["batch_id"] if "voteId" not in item else \
                "%s in %s" % (item["voteId"], item["batch_id"])
            click.echo("%s %s: %s" % (item["problem"].upper(), name, item["detail"]))
        click.echo("%s: %d batches, %d records, %d problems"
                   % ("OK" if report["ok"] else "FAILED", report["batches"], report["records"],
                      len(report["problems"])))
    if not report["ok"]:
        sys.exit(1)


def register(group):
    """Add the receiver's commands to the `pingjia province` group."""
    for command in (serve, stats, verify):
        group.add_command(command)
