"""The `pingjia` command line: one group per component, thin over the libraries."""
import sys

import click

from hub import PingjiaError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pingjia")
def cli():
    """Pingjia: counter rating devices and the hall hub (好差评评价器)."""


@cli.group()
def hub():
    """The hall hub: broker, ingest, forwarding, status."""


@cli.group()
def device():
    """Provision and inspect counter evaluators."""


def _register():
    # Each component owns its group; importing here keeps `pingjia --help` one place.
    from simulator.cli import sim, province
    from simulator.bench import bench
    from agent.cli import agent
    from hub.cli_admin import register as register_admin
    from hub.cli_run import register as register_run
    from hub.cli_flash import register as register_flash
    from hub.cli_keys import register as register_keys
    from hub.cli_devices import register as register_devices
    from hub.cli_systems import register as register_systems
    from hub.cli_updates import register as register_updates

    register_admin(hub, device)
    register_run(hub)
    register_flash(device)
    register_keys(hub)
    register_devices(hub)
    register_systems(hub)
    register_updates(hub)

    cli.add_command(sim)
    cli.add_command(province)
    cli.add_command(agent)
    cli.add_command(bench)


_register()


def main():
    try:
        # Without standalone mode click returns ctx.exit(n)'s code instead of exiting.
        code = cli.main(standalone_mode=False)
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
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
