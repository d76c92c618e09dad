"""`pingjia hub keys …`, `pingjia hub verify` and `pingjia hub stats`: the hub's batch keys,
province credentials and audit trail. Thin over hub.keys and hub.audit; library errors
(PingjiaError) become one-line messages in hub.cli.main. Private keys and secrets are never
printed.
"""
import json
import os
import sys

import click

from hub import PingjiaError
from hub.cli_admin import config_option, load_settings


def _echo_json(obj):
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def _profile(settings):
    from hub import batch as batchlib

    return batchlib.load_profile(settings.province.profile)


def _scheme_option(f):
    from hub.schemes import SCHEMES

    return click.option("--scheme", type=click.Choice(SCHEMES),
                        help="Signature scheme [the first one the hub's profile accepts].")(f)


# -- pingjia hub keys -------------------------------------------------------------------------

@click.group("keys")
def keys_group():
    """The hub's batch signing keys and province credentials."""


@keys_group.command("generate")
@config_option
@_scheme_option
@click.option("--force", is_flag=True,
              help="Replace an existing key WITHOUT a rotation statement (the province must "
                   "be given the new public key by hand).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def keys_generate(config_path, scheme, force, as_json):
    """Create the batch signing key (refuses to replace one: use `rotate`)."""
    from hub import batch as batchlib
    from hub import keys

    settings = load_settings(config_path)
    profile = _profile(settings)
    scheme = scheme or batchlib.preferred_scheme(profile)
    if scheme not in batchlib.accepted_schemes(profile):
        raise PingjiaError("profile %s does not accept %s signatures (it accepts %s)" % (
            profile["name"], scheme, ", ".join(batchlib.accepted_schemes(profile))))
    path = settings.signing_key_path
    if os.path.exists(path) and not force:
        raise PingjiaError("%s: a signing key exists; `pingjia hub keys rotate` changes it "
                           "without breaking the chain (--force starts over)" % path)
    key = keys.generate_signing_key(path, force=force, scheme=scheme)
    result = {"key_id": key.key_id, "alg": key.scheme, "path": path,
              "public_key_pem": keys.public_key_pem(key).decode("ascii")}
    if as_json:
        _echo_json(result)
        return
    click.echo("%s key %s written to %s" % (result["alg"], result["key_id"], path))
    click.echo("public key for the province:\n%s" % result["public_key_pem"].rstrip())


@keys_group.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def keys_list(config_path, as_json):
    """Every batch key the hub has used: id, scheme, created, retired, introduced by."""
    from hub import keys

    settings = load_settings(config_path)
    path = settings.signing_key_path
    active = keys.load_signing_key(path).key_id if os.path.exists(path) else None
    entries = []
    for entry in keys.read_keyring(path):
        entries.append({
            "key_id": entry["key_id"], "alg": entry.get("alg"), "created": entry.get("created"),
            "retired": entry.get("retired"), "active": entry["key_id"] == active,
            "rotated_from": (entry.get("rotation") or {}).get("by"),
        })
    if active and not any(e["active"] for e in entries):
        key = keys.load_signing_key(path)
        entries.append({"key_id": active, "alg": key.scheme, "created": None, "retired": None,
                        "active": True, "rotated_from": None})
    if as_json:
        _echo_json(entries)
        return
    if not entries:
        click.echo("no batch signing key yet (`pingjia hub keys generate`)")
    for e in entries:
        click.echo("%s %-16s %-10s created %s%s%s" % (
            "*" if e["active"] else " ", e["key_id"], e["alg"], e["created"] or "?",
            ", retired %s" % e["retired"] if e["retired"] else "",
            ", rotated from %s" % e["rotated_from"] if e["rotated_from"] else ""))


@keys_group.command("rotate")
@config_option
@_scheme_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def keys_rotate(config_path, scheme, as_json):
    """Replace the signing key; the old key signs a statement introducing the new one.

    The next batch is signed by the new key and carries the statement, so the province
    learns the key from the chain itself. A running hub picks the new key up by itself."""
    from hub import batch as batchlib
    from hub import keys

    settings = load_settings(config_path)
    profile = _profile(settings)
    if scheme and scheme not in batchlib.accepted_schemes(profile):
        raise PingjiaError("profile %s does not accept %s signatures" % (profile["name"], scheme))
    key, statement = keys.rotate_signing_key(settings.signing_key_path, settings.hub.id,
                                             scheme=scheme)
    result = {"key_id": key.key_id, "alg": key.scheme, "rotated_from": statement["by"],
              "public_key_pem": keys.public_key_pem(key).decode("ascii")}
    if as_json:
        _echo_json(result)
        return
    click.echo("rotated %s -> %s (%s); the next batch introduces it to the province"
               % (statement["by"], key.key_id, key.scheme))


@keys_group.command("export-public")
@config_option
@click.option("--key-id", help="A key from `keys list` (default: the active key).")
@click.option("--all", "all_keys", is_flag=True, help="Every key in the keyring.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Write to this file.")
def keys_export_public(config_path, key_id, all_keys, out_path):
    """Print (or write) public key PEM for the province to trust."""
    from hub import keys, schemes

    settings = load_settings(config_path)
    path = settings.signing_key_path
    ring = keys.keyring_public_keys(path)
    if all_keys:
        chosen = [ring[k] for k in sorted(ring)]
    else:
        kid = key_id or keys.load_signing_key(path).key_id
        if kid not in ring:
            raise PingjiaError("no key %s in the keyring" % kid)
        chosen = [ring[kid]]
    text = "".join(schemes.public_pem(k).decode("ascii") for k in chosen)
    if out_path:
        keys.write_public(out_path, text.encode("ascii"))
        click.echo("wrote %d public key(s) to %s" % (len(chosen), out_path))
    else:
        click.echo(text, nl=False)


@keys_group.command("credentials")
@config_option
@click.argument("source", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def keys_credentials(config_path, source, as_json):
    """Install the credentials the province issued (a JSON file with token, app_key,
    app_secret, sm4_key) as a 0600 file, or, without SOURCE, show which are set."""
    from hub import batch as batchlib
    from hub import keys

    settings = load_settings(config_path)
    target = keys.credentials_path(settings.signing_key_path)
    if source:
        credentials = batchlib.load_credentials(source)
        keys.write_secret(target, json.dumps(credentials, indent=2).encode("utf-8"))
    elif os.path.exists(target):
        credentials = batchlib.load_credentials(target)
    else:
        credentials = {}
    needed = batchlib.needed_credentials(_profile(settings))
    result = {"path": target, "set": sorted(credentials),
              "missing": [name for name in needed if name not in credentials]}
    if as_json:
        _echo_json(result)
        return
    click.echo("%s: %s" % (target, ", ".join(result["set"]) or "nothing set"))
    if result["missing"]:
        click.echo("profile %s still needs: %s" % (settings.province.profile,
                                                  ", ".join(result["missing"])))


# -- pingjia hub verify / stats -------------------------------------------------------------

def _open_store(settings):
    from hub.store import Store

    if not os.path.exists(settings.db_path):
        raise PingjiaError("%s: no hub store yet (has the hub run?)" % settings.db_path)
    return Store(settings.db_path)


@click.command("verify")
@config_option
@click.option("--trust", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Check signatures with this public key PEM instead of the keyring "
                   "(repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def verify(config_path, trust, as_json):
    """Re-check the hub's batches: signatures, chain links, gaps, and every vote against its
    signed record; exit 1 when anything is wrong."""
    from hub import audit, keys
    from hub import batch as batchlib

    settings = load_settings(config_path)
    if trust:
        trusted = {}
        for path in trust:
            with open(path, "rb") as f:
                public = batchlib.load_public_key(f.read())
            trusted[batchlib.key_id(public)] = public
    else:
        trusted = keys.keyring_public_keys(settings.signing_key_path)
    store = _open_store(settings)
    try:
        report = audit.verify_hub(store, settings.hub.id, trusted)
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


@click.command("stats")
@config_option
@click.option("--from", "source", type=click.Choice(["votes", "chain"]), default="votes",
              show_default=True,
              help="votes: the stored votes; chain: the batches' signed records alone.")
@click.option("--by", "by", default=",".join(("hall", "window", "staff", "item", "department")),
              show_default=True, help="Comma-separated dimensions.")
@click.option("--at", "at_text", help="Count default ratings as of this time (unix seconds or "
                                      "ISO 8601) [now].")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row.")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of rows.")
@click.option("--output", "output", type=click.Path(dir_okay=False),
              help="Write to this file instead of standard output.")
def stats(config_path, source, by, at_text, as_csv, as_json, output):
    """Hall statistics: 好评率 per window, staff, item and department; counts by level;
    unrated and default-rated services (by the hub's jurisdiction's default rule)."""
    import time

    from hub import audit, policy

    if as_csv and as_json:
        raise click.UsageError("--csv and --json exclude each other")
    settings = load_settings(config_path)
    profile = _profile(settings)
    at = audit.parse_at(at_text)
    at = int(time.time()) if at is None else at
    dims = [d.strip() for d in by.split(",") if d.strip()]
    store = _open_store(settings)
    try:
        jurisdiction = policy.current(store, settings.province.profile)
        if source == "votes":
            services = audit.services_from_votes(store)
        else:
            services = audit.services_from_chain(store, audit.device_windows(store))
    finally:
        store.close()
    rows = audit.hall_stats(services, jurisdiction, settings.hub.id, at, dims,
                            profile.get("bad_max_stars", 2))
    if as_csv:
        text = audit.stats_csv(rows)
    elif as_json:
        text = json.dumps(rows, ensure_ascii=False, indent=2) + "\n"
    else:
        lines = ["%-10s %-20s %6s %6s %6s %8s %7s %8s" % ("dimension", "key", "votes", "good",
                                                         "bad", "好评率", "unrated", "default")]
        for row in rows:
            rate = "-" if row["good_rate"] is None else "%.2f%%" % (row["good_rate"] * 100)
            lines.append("%-10s %-20s %6d %6d %6d %8s %7d %8d" % (
                row["dimension"], (row["key"] or "(none)")[:20], row["votes"], row["good"],
                row["bad"], rate, row["unrated"], row["default_rated"]))
        text = "\n".join(lines) + "\n"
    if output:
        with open(output, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    else:
        click.echo(text, nl=False)


def register(hub_group):
    """Attach `keys`, `verify` and `stats` to the `pingjia hub` group."""
    hub_group.add_command(keys_group)
    hub_group.add_command(verify)
    hub_group.add_command(stats)
