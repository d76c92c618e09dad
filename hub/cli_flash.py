"""`pingjia device flash` and flash.sh: one command flashes a counter evaluator over USB;
`pingjia device image`: the firmware image file for a board (a release for the hub).

Thin over hub.flashing. Each FlashError ends the command with one line (`error: …`) and its
own exit status (docs/technician.md, "Exit codes"); progress goes to stdout, or to stderr
with --json so stdout holds only the JSON summary. Secrets are never printed.
"""
import json
import sys

import click

from hub import PingjiaError
from hub.flashing import DEFAULT_BOARD, DEFAULT_BUILD, FlashError, FlashRequest, Tools, flash
from hub.flashing import load_board
from hub.images import ImageError, build_image

WIFI_PASSWORD_ENV = "PINGJIA_WIFI_PASSWORD"


def _wifi(ssid, password):
    if ssid is None:
        source = click.get_current_context().get_parameter_source("wifi_password")
        # A password kept in the environment for the day's work is not a mistake when this
        # unit's Wi-Fi comes from its provisioning file; one typed on the line is.
        if password and source != click.core.ParameterSource.ENVIRONMENT:
            raise click.UsageError("--wifi-password needs --wifi-ssid")
        return None
    return {"ssid": ssid, "password": password or ""}


@click.command("flash")
@click.option("--device-id", required=True, help="Device id to flash, e.g. D0007.")
@click.option("--window", help="Counter window id (new devices; must match an exported file).")
@click.option("--port", help="Serial port (default: the only USB serial device plugged in).")
@click.option("--board", default=DEFAULT_BOARD, show_default=True,
              help="Board file in hardware/boards/ (name or path).")
@click.option("--hub-config", type=click.Path(dir_okay=False),
              help="The hub's hub.toml: credentials from its registry, first heartbeat watched.")
@click.option("--provisioning", type=click.Path(dir_okay=False),
              help="Provisioning file from `pingjia device add --export` (hub not reachable).")
@click.option("--replace", is_flag=True,
              help="New identity for an id the hub already knows (a replacement unit).")
@click.option("--label", help="Free text for the hall manager (new devices).")
@click.option("--client-cert", is_flag=True, help="Also issue a TLS client certificate.")
@click.option("--hub-host", help="Address the unit uses to reach the hub (default: broker.host).")
@click.option("--wifi-ssid", help="Wi-Fi network the unit joins.")
@click.option("--wifi-password", envvar=WIFI_PASSWORD_ENV,
              help="Wi-Fi password (or env %s, kept out of shell history)." % WIFI_PASSWORD_ENV)
@click.option("--base-image", type=click.Path(dir_okay=False),
              help="MicroPython .bin to write first with esptool (new or broken boards).")
@click.option("--chip", help="esptool chip for --base-image [the board's, esp32s3].")
@click.option("--erase", is_flag=True, help="Erase the whole flash before --base-image.")
@click.option("--force", is_flag=True,
              help="Flash over another identity's journal (it is wiped) or erase one.")
@click.option("--wait", "wait_s", type=float, default=120.0, show_default=True,
              help="Seconds to wait for the first heartbeat at the hub; 0 = don't.")
@click.option("--require-heartbeat", is_flag=True,
              help="Fail (instead of skipping) when the hub cannot be watched.")
@click.option("--build-dir", type=click.Path(file_okay=False), default=DEFAULT_BUILD,
              help="Where mpy-cross output is kept between runs.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (no secrets).")
def flash_command(device_id, window, port, board, hub_config, provisioning, replace, label,
                  client_cert, hub_host, wifi_ssid, wifi_password, base_image, chip, erase, force,
                  wait_s, require_heartbeat, build_dir, as_json):
    """Flash and provision one counter evaluator over USB serial.

    Steps: port, base image (optional, esptool), board check, build (mpy-cross),
    credentials (hub or provisioning file), copy (mpremote), verify (sha256 read back),
    first heartbeat at the hub. Environment: PINGJIA_FLASH_PORTS (port globs instead
    of the USB scan), PINGJIA_ESPTOOL and PINGJIA_MPREMOTE (commands standing in for
    esptool and mpremote).
    """
    request = FlashRequest(
        device_id=device_id, board=board, port=port, window=window, hub_config=hub_config,
        provisioning=provisioning, replace=replace, label=label, client_cert=client_cert,
        hub_host=hub_host, wifi=_wifi(wifi_ssid, wifi_password), base_image=base_image,
        chip=chip, erase=erase, force=force, wait_s=wait_s,
        require_heartbeat=require_heartbeat, build_dir=build_dir)

    def echo(line):
        click.echo(line, err=as_json)

    try:
        result = flash(request, tools=Tools.from_env(), echo=echo)
    except FlashError as exc:
        click.echo("error: %s" % exc, err=True)
        # sys.exit, not ctx.exit: the pingjia entry point runs click with
        # standalone_mode=False, which would turn ctx.exit(n) into a return value.
        sys.exit(exc.exit_code)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, ensure_ascii=False))
    else:
        click.echo("done: %s flashed and verified on %s (heartbeat %s)"
                   % (result.device_id, result.port, result.heartbeat))


@click.command("image")
@click.option("--board", default=DEFAULT_BOARD, show_default=True,
              help="Board file in hardware/boards/ (name or path).")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True,
              help="Where to write the image (e.g. pingjia-0.2.0-esp32s3.romfs).")
@click.option("--build-dir", type=click.Path(file_okay=False), default=DEFAULT_BUILD,
              help="Where mpy-cross output is kept between runs.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def image_command(board, out, build_dir, as_json):
    """Build the firmware image for a board: the file flash.sh writes into app slot 0 and
    `pingjia hub release add` takes for an update over the air."""
    try:
        spec = load_board(board)
        image = build_image(spec, build_dir=build_dir, out=out)
    except (FlashError, ImageError) as exc:
        click.echo("error: %s" % exc, err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps({"path": image.path, "board": spec.name, "version": image.version,
                               "sha256": image.sha256, "size": image.size}, indent=2))
        return
    click.echo("image %s: firmware %s for board %s, %d bytes, sha256 %s"
               % (out, image.version, spec.name, image.size, image.sha256))
    click.echo("release it: pingjia hub release add %s --version %s --board %s"
               % (out, image.version, spec.name))


def register(device_group):
    """Attach `flash` and `image` to the `pingjia device` group."""
    device_group.add_command(flash_command)
    device_group.add_command(image_command)


def main():
    """flash.sh's entry: the flash command alone, with the same error handling as pingjia."""
    try:
        flash_command.main(prog_name="flash.sh", standalone_mode=False)
    except PingjiaError as exc:
        click.echo("error: %s" % exc, err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
