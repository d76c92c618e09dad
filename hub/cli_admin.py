"""Admin commands: `pingjia hub init`, `pingjia hub broker-config` and `pingjia device …`.

Thin over hub.settings, hub.keys, hub.broker and hub.provision; library errors
(PingjiaError) become one-line messages in hub.cli.main. Secrets are never printed: device
credentials go only into a 0600 file given with --export.
"""
import json
import os

import click

from hub import PingjiaError
from hub.broker import BrokerFiles, write_broker_files
from hub.keys import HallTLS, ensure_hall_tls, ensure_signing_key, public_key_pem
from hub.provision import add_device, export_provisioning, list_devices, remove_device
from hub.settings import Settings, write_default

CONFIG_ENV = "PINGJIA_CONFIG"


def config_option(f):
    """--config FILE, else $PINGJIA_CONFIG, else ./hub.toml. Other commands may reuse it."""
    return click.option("--config", "config_path", envvar=CONFIG_ENV, default="hub.toml",
                        show_default=True, type=click.Path(dir_okay=False),
                        help="Hub settings file (env %s)." % CONFIG_ENV)(f)


def load_settings(config_path):
    return Settings.load(config_path)


def _echo_json(obj):
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


# -- pingjia hub ------------------------------------------------------------------------------

@click.command("init")
@click.option("--dir", "folder", type=click.Path(file_okay=False),
              help="Folder for hub.toml (default: where --config points, else .).")
@config_option
@click.option("--force", is_flag=True, help="Overwrite an existing hub.toml (keys are kept).")
@click.option("--hub-id", help="Hub identifier [hall-1].")
@click.option("--host", help="Broker listen address [127.0.0.1]; 0.0.0.0 for the hall LAN.")
@click.option("--port", type=int, help="Broker MQTT port [1883].")
@click.option("--tls-port", type=int, help="Broker TLS port; 0 = off [0].")
@click.option("--require-client-cert", is_flag=True, default=None,
              help="TLS clients must present a hall CA certificate.")
@click.option("--http-port", type=int, help="HTTP API port [8080].")
@click.option("--province", "endpoint", help="Province endpoint URL.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def hub_init(folder, config_path, force, hub_id, host, port, tls_port, require_client_cert,
             http_port, endpoint, as_json):
    """Write hub.toml (fresh hub broker password), the signing key, and the hall CA when TLS."""
    path = os.path.join(folder, "hub.toml") if folder else config_path
    overrides = {}

    def put(section, key, value):
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    put("hub", "id", hub_id)
    put("broker", "host", host)
    put("broker", "port", port)
    put("broker", "tls_port", tls_port)
    put("broker", "require_client_cert", require_client_cert)
    put("http", "port", http_port)
    put("province", "endpoint", endpoint)
    settings = write_default(path, force=force, **overrides)
    # An existing signing key or CA is kept: the province has registered the key and the
    # devices trust the CA; replacing either is a deliberate act (delete the file first).
    key = ensure_signing_key(settings.signing_key_path)
    if settings.broker.tls_port:
        ensure_hall_tls(settings)
    files = write_broker_files(settings)
    result = {
        "config": settings.source,
        "hub_id": settings.hub.id,
        "data_dir": settings.data_dir,
        "signing_key": settings.signing_key_path,
        "public_key_pem": public_key_pem(key).decode("ascii"),
        "broker_conf": files.conf,
        "ca_cert": HallTLS.for_settings(settings).ca_cert if settings.broker.tls_port else None,
    }
    if as_json:
        _echo_json(result)
        return
    click.echo("wrote %s (hub %s)" % (result["config"], result["hub_id"]))
    click.echo("signing key: %s" % result["signing_key"])
    if result["ca_cert"]:
        click.echo("hall CA: %s" % result["ca_cert"])
    click.echo("broker config: %s" % result["broker_conf"])
    click.echo("public key for the province:\n%s" % result["public_key_pem"].rstrip())


@click.command("broker-config")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def hub_broker_config(config_path, as_json):
    """Regenerate the broker files from hub.toml and print where they are."""
    settings = load_settings(config_path)
    files = write_broker_files(settings)
    paths = {
        "mode": settings.broker.mode,
        "conf": files.conf,
        "passwd": files.passwd,
        "acl": files.acl,
        "persistence": files.persistence,
        "log": files.log,
        "pid": files.pid,
        "tls_dir": files.tls_dir if settings.broker.tls_port else None,
        "listen": "%s:%d" % (settings.broker.host, settings.broker.port),
        "tls_listen": ("%s:%d" % (settings.broker.host, settings.broker.tls_port)
                       if settings.broker.tls_port else None),
    }
    if as_json:
        _echo_json(paths)
        return
    for key, value in paths.items():
        if value is not None:
            click.echo("%-12s %s" % (key, value))
    if settings.broker.mode == "external":
        click.echo("run it yourself: mosquitto -c %s" % files.conf)


# -- pingjia device ---------------------------------------------------------------------------

def _wifi(ssid, password):
    if ssid is None:
        if password is not None:
            raise click.UsageError("--wifi-password needs --wifi-ssid")
        return None
    return {"ssid": ssid, "password": password or ""}


def _summary(provisioned):
    return {"device_id": provisioned.device_id, "window": provisioned.window,
            "label": provisioned.label, "hub_host": provisioned.hub_host,
            "hub_port": provisioned.hub_port, "tls": provisioned.tls,
            "seq_floor": provisioned.seq_floor}


def _wifi_options(f):
    f = click.option("--wifi-password", help="Wi-Fi password written into the export.")(f)
    return click.option("--wifi-ssid", help="Wi-Fi network written into the export.")(f)


@click.command("add")
@click.argument("device_id")
@config_option
@click.option("--window", help="Counter window id this device stands at.")
@click.option("--label", help="Free text for the hall manager.")
@click.option("--client-cert", is_flag=True, help="Also issue a TLS client certificate.")
@click.option("--replace", is_flag=True, help="New identity for an id the hub already knows.")
@click.option("--hub-host", help="Address devices use to reach the hub (default: broker.host).")
@click.option("--export", "export_path", type=click.Path(dir_okay=False),
              help="Write the provisioning file (0600) for flash.sh here.")
@_wifi_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (no secrets).")
def device_add(device_id, config_path, window, label, client_cert, replace, hub_host, export_path,
               wifi_ssid, wifi_password, as_json):
    """Provision a device: registry entry, MAC key, broker login (broker reloaded)."""
    settings = load_settings(config_path)
    wifi = _wifi(wifi_ssid, wifi_password)
    provisioned = add_device(settings, device_id, window=window, label=label,
                             client_cert=client_cert, replace=replace, hub_host=hub_host)
    if export_path:
        export_provisioning(settings, device_id, path=export_path, provisioned=provisioned,
                            wifi=wifi)
    result = _summary(provisioned)
    result["export"] = os.path.abspath(export_path) if export_path else None
    if as_json:
        _echo_json(result)
        return
    click.echo("provisioned %s%s -> %s:%d%s" % (
        device_id, " at window %s" % window if window else "", provisioned.hub_host,
        provisioned.hub_port, " (TLS)" if provisioned.tls else ""))
    if export_path:
        click.echo("provisioning file: %s" % result["export"])
    else:
        click.echo("no --export: get credentials later with `pingjia device export %s FILE` "
                   "(issues a new broker password)" % device_id)


@click.command("export")
@click.argument("device_id")
@click.argument("path", type=click.Path(dir_okay=False))
@config_option
@click.option("--hub-host", help="Address devices use to reach the hub (default: broker.host).")
@_wifi_options
def device_export(device_id, path, config_path, hub_host, wifi_ssid, wifi_password):
    """Write a device's provisioning file (0600) with a NEW broker password."""
    settings = load_settings(config_path)
    export_provisioning(settings, device_id, path=path, wifi=_wifi(wifi_ssid, wifi_password),
                        hub_host=hub_host)
    click.echo("provisioning file: %s (the device's previous broker password no longer works)"
               % os.path.abspath(path))


@click.command("list")
@config_option
@click.option("--all", "include_retired", is_flag=True, help="Include retired devices.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def device_list(config_path, include_retired, as_json):
    """Devices provisioned on this hub."""
    settings = load_settings(config_path)
    devices = list_devices(settings, include_retired=include_retired)
    if as_json:
        _echo_json([d.as_dict() for d in devices])
        return
    if not devices:
        click.echo("no devices")
        return
    click.echo("%-20s %-10s %-8s %-20s %s" % ("DEVICE", "WINDOW", "STATE", "CREATED", "LABEL"))
    for d in devices:
        state = "retired" if d.retired else ("active" if d.broker_login else "no-login")
        click.echo("%-20s %-10s %-8s %-20s %s" % (d.device_id, d.window or "-", state,
                                                  d.created_at, d.label or ""))


@click.command("remove")
@click.argument("device_id")
@config_option
def device_remove(device_id, config_path):
    """Retire a device: broker login removed, its votes kept."""
    settings = load_settings(config_path)
    if remove_device(settings, device_id):
        click.echo("retired %s" % device_id)
    else:
        click.echo("%s was already retired" % device_id)


def register(hub_group, device_group):
    """Attach these commands to the `pingjia hub` and `pingjia device` groups."""
    hub_group.add_command(hub_init)
    hub_group.add_command(hub_broker_config)
    for command in (device_add, device_export, device_list, device_remove):
        device_group.add_command(command)


__all__ = ["register", "config_option", "load_settings", "PingjiaError"]
