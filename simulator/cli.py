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


@sim.command("run")
@click.option("--devices", default=20, show_default=True, type=click.IntRange(1, 500),
              help="Simulated evaluators, one per window (W001…).")
@click.option("--votes", default=60, show_default=True, type=click.IntRange(0),
              help="Citizen visits in total, spread over the windows.")
@click.option("--heap", default="64wK", show_default=True,
              help="MicroPython heap per device (-X heapsize; 64wK = 64 KB of 32-bit words).")
@click.option("--seed", type=int, help="Random seed for citizens (printed in the summary).")
@click.option("--deadline", default=300.0, show_default=True, type=click.FloatRange(1),
              help="Seconds until the run gives up waiting for the province.")
@click.option("--hub-config", type=click.Path(exists=True, dir_okay=False),
              help="Use the hub running with this hub.toml instead of starting one.")
@click.option("--province-url", help="Use this running provincial receiver (base URL).")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Folder for the run (default: a temporary one, removed after a good run).")
@click.option("--keep", is_flag=True, help="Keep the work folder after a good run.")
@click.option("--no-forgeries", is_flag=True, help="Do not inject forged and replayed votes.")
@click.option("--bad", "bad_share", default=0.15, show_default=True, type=click.FloatRange(0, 1),
              help="Share of citizens who rate 1-2 stars and choose reasons.")
@click.option("--walk-away", "walk_share", default=0.05, show_default=True,
              type=click.FloatRange(0, 1), help="Share of citizens who leave without rating.")
@click.option("--misuse", "misuse_share", default=0.1, show_default=True,
              type=click.FloatRange(0, 1), help="Share of visits with stray key presses first.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as one JSON object on the last line.")
def sim_run(devices, votes, heap, seed, deadline, hub_config, province_url, workdir, keep,
            no_forgeries, bad_share, walk_share, misuse_share, as_json):
    """Run a simulated hall end to end and check every vote reached the province once."""
    from simulator.citizens import Mix
    from simulator.run import Options, format_summary, run

    if bad_share + walk_share > 1:
        raise click.BadParameter("--bad and --walk-away together exceed 1")
    opts = Options(devices=devices, votes=votes, heap=heap, seed=seed, deadline_s=deadline,
                   hub_config=hub_config, province_url=province_url, workdir=workdir,
                   keep=keep, forged=not no_forgeries,
                   mix=Mix(bad=bad_share, walk_away=walk_share, misuse=misuse_share))
    live = not as_json and sys.stderr.isatty()
    say = (lambda line: None) if as_json else (lambda line: click.echo(line, err=True))
    summary = run(opts, say=say, live=live)
    if as_json:
        click.echo(json.dumps(summary, ensure_ascii=False))
    else:
        click.echo(format_summary(summary))
    if not summary["ok"]:
        raise click.exceptions.Exit(1)
