"""`pingjia sim …` and `pingjia province …`."""
import json
import sys

import click


@click.group()
def sim():
    """Run simulated devices and citizens against a real broker and hub."""


@click.group()
def province():
    """The reference provincial 好差评 receiver."""


def _register_province():
    from simulator.province_cli import register

    register(province)


_register_province()


def hall_options(f):
    """The options `sim run` and `sim chaos` share."""
    options = [
        click.option("--devices", default=20, show_default=True, type=click.IntRange(1, 1000),
                     help="Simulated evaluators, one per window (W001…)."),
        click.option("--votes", default=60, show_default=True, type=click.IntRange(0),
                     help="Citizen visits in total, spread over the windows."),
        click.option("--heap", default="64wK", show_default=True,
                     help="MicroPython heap per device (-X heapsize; 64wK = 64 K words, "
                          "the board's GC blocks; 64K = its 64 KB taken literally)."),
        click.option("--seed", type=int,
                     help="Random seed for citizens (and faults); printed in the summary."),
        click.option("--deadline", default=None, type=click.FloatRange(1),
                     help="Seconds until the run gives up waiting for the province "
                          "[default: 300, chaos 600]."),
        click.option("--hub-config", type=click.Path(exists=True, dir_okay=False),
                     help="Use the hub running with this hub.toml instead of starting one."),
        click.option("--province-url", help="Use this running provincial receiver (base URL)."),
        click.option("--workdir", type=click.Path(file_okay=False),
                     help="Folder for the run (default: a temporary one, removed after a "
                          "good run)."),
        click.option("--keep", is_flag=True, help="Keep the work folder after a good run."),
        click.option("--no-forgeries", is_flag=True,
                     help="Do not inject forged and replayed votes."),
        click.option("--bad", "bad_share", default=0.15, show_default=True,
                     type=click.FloatRange(0, 1),
                     help="Share of citizens who rate 1-2 stars and choose reasons."),
        click.option("--walk-away", "walk_share", default=0.05, show_default=True,
                     type=click.FloatRange(0, 1),
                     help="Share of citizens who leave without rating."),
        click.option("--misuse", "misuse_share", default=0.1, show_default=True,
                     type=click.FloatRange(0, 1),
                     help="Share of visits with stray key presses first."),
        click.option("--prompt-wait", default=None, type=click.FloatRange(0, 30),
                     help="Seconds the hub waits for the device's answer before it answers "
                          "a prompt request [default: the hub's, 5]; 0 spares a busy hub."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print the summary as one JSON object on the last line."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _options(params, default_deadline):
    from simulator.citizens import Mix
    from simulator.run import Options

    if params["bad_share"] + params["walk_share"] > 1:
        raise click.BadParameter("--bad and --walk-away together exceed 1")
    return Options(devices=params["devices"], votes=params["votes"], heap=params["heap"],
                   seed=params["seed"], deadline_s=params["deadline"] or default_deadline,
                   hub_config=params["hub_config"], province_url=params["province_url"],
                   workdir=params["workdir"], keep=params["keep"],
                   forged=not params["no_forgeries"],
                   mix=Mix(bad=params["bad_share"], walk_away=params["walk_share"],
                           misuse=params["misuse_share"],
                           prompt_wait_s=params["prompt_wait"]))


def _report(summary, as_json):
    from simulator.run import format_summary

    if as_json:
        click.echo(json.dumps(summary, ensure_ascii=False))
    else:
        click.echo(format_summary(summary))
    if not summary["ok"]:
        raise click.exceptions.Exit(1)


def _voices(as_json):
    live = not as_json and sys.stderr.isatty()
    say = (lambda line: None) if as_json else (lambda line: click.echo(line, err=True))
    return say, live


@sim.command("run")
@hall_options
def sim_run(**params):
    """Run a simulated hall end to end and check every vote reached the province once."""
    from simulator.run import run

    opts = _options(params, 300.0)
    say, live = _voices(params["as_json"])
    _report(run(opts, say=say, live=live), params["as_json"])


@sim.command("chaos")
@hall_options
@click.option("--faults", "kinds", default="power,network,broker,hub,province",
              show_default=True, metavar="KINDS",
              help="Comma-separated fault kinds: power, network, broker, hub, province "
                   "(or 'all').")
@click.option("--fault-every", default=3.0, show_default=True, type=click.FloatRange(0.1),
              help="Mean seconds between injected faults.")
def sim_chaos(kinds, fault_every, **params):
    """A simulated hall under faults (power cuts, network cuts, broker and hub kills,
    province outages); afterwards every durable vote must be at the province once."""
    from simulator.chaos import ChaosOptions, parse_kinds, run

    opts = _options(params, 600.0)
    chaos = ChaosOptions(kinds=parse_kinds(kinds), every_s=fault_every)
    say, live = _voices(params["as_json"])
    _report(run(opts, chaos, say=say, live=live), params["as_json"])


@sim.command("update")
@hall_options
@click.option("--canary", default=2, show_default=True, type=click.IntRange(1),
              help="Devices each rollout tries first.")
@click.option("--batch", default=3, show_default=True, type=click.IntRange(1),
              help="Devices updating at once after the canaries.")
@click.option("--download-cuts", default=2, show_default=True, type=click.IntRange(0),
              help="Power cuts of devices in the middle of their download.")
@click.option("--install-cuts", default=2, show_default=True, type=click.IntRange(0),
              help="Power cuts of devices right after they installed the new image.")
@click.option("--no-bad-images", is_flag=True,
              help="Skip the crashing and the corrupted image; only the good rollout.")
def sim_update(canary, batch, download_cuts, install_cuts, no_bad_images, **params):
    """A firmware update across a simulated fleet while citizens vote: a crashing image and
    a corrupted one are stopped at the canaries, the good one reaches every device through
    power cuts; afterwards no device lacks working firmware and no vote is lost."""
    from simulator.run import format_summary
    from simulator.update import UpdateOptions, format_update, run

    params["no_forgeries"] = True
    opts = _options(params, 900.0)
    uopts = UpdateOptions(canary=canary, batch=batch, download_cuts=download_cuts,
                          install_cuts=install_cuts, bad_images=not no_bad_images)
    say, live = _voices(params["as_json"])
    summary = run(opts, uopts, say=say, live=live)
    if params["as_json"]:
        click.echo(json.dumps(summary, ensure_ascii=False))
    else:
        click.echo(format_update(summary))
        click.echo(format_summary(summary))
    if not summary["ok"]:
        raise click.exceptions.Exit(1)


@sim.command("demo")
@click.option("--duration", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Seconds to run; 0 runs until Ctrl-C.")
@click.option("--devices", default=20, show_default=True, type=click.IntRange(1, 1000),
              help="Simulated evaluators, one per window.")
@click.option("--http-port", default=8080, show_default=True, type=click.IntRange(1, 65535),
              help="The hub's HTTP port (API and dashboard) on 127.0.0.1.")
@click.option("--province-port", default=9100, show_default=True,
              type=click.IntRange(1, 65535), help="The provincial receiver's port.")
@click.option("--heap", default="64wK", show_default=True, help="MicroPython heap per device.")
@click.option("--seed", type=int, help="Random seed for the citizens.")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Folder for the hall (default: a temporary one, removed at the end).")
@click.option("--keep", is_flag=True, help="Keep the temporary folder at the end.")
def sim_demo(duration, devices, http_port, province_port, heap, seed, workdir, keep):
    """A hall of simulated evaluators with citizens voting at a gentle pace, the hub with
    its dashboard and the provincial receiver; prints where to look."""
    from simulator.demo import DemoOptions, run

    opts = DemoOptions(devices=devices, duration_s=duration, http_port=http_port,
                       province_port=province_port, heap=heap, seed=seed, workdir=workdir,
                       keep=keep)
    result = run(opts, out=lambda line: click.echo(line), live=sys.stderr.isatty())
    click.echo("demo stopped (%s): %d visits, %d votes cast, %d unrated, %d records at the "
               "province" % (result["stopped_by"], result["visits"], result["votes_cast"],
                             result["unrated"], result["at_province"]))
