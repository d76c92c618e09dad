"""`pingjia agent …`: the Raspberry Pi evaluator and the serial bridge, thin over
agent/runtime.py and agent/bridge.py. Library errors (PingjiaError) become one-line
messages in hub.cli.main; docs/agent.md is the manual."""
import json
import logging
import os
import signal
import threading

import click

from . import AgentError

LEVELS = ["debug", "info", "warning", "error"]


def _logging(level):
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _stop_on_signals():
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    for name in ("SIGINT", "SIGTERM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)
    return stop


def _lock(state_dir):
    """One agent per journal: a second one would hand out the same sequence numbers."""
    import fcntl

    path = os.path.join(state_dir, "agent.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise AgentError("%s: another agent runs on this state folder" % state_dir) from None
    return fd


@click.group()
def agent():
    """Linux-class evaluators and the serial bridge."""


@agent.command()
@click.option("--config", "-c", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The device config: the provisioning file `pingjia device add --export` writes.")
@click.option("--board", "-b", "board_path", required=True, type=click.Path(dir_okay=False),
              help="The board file (hardware/boards/rpi-evaluator.json).")
@click.option("--state-dir", envvar="STATE_DIRECTORY",
              help="Journal and lock folder [env STATE_DIRECTORY, else the config's folder].")
@click.option("--display", "display_name", help="Display entry of the board file to use "
              "instead of its default (ssd1322, ssd1306, sh1106).")
@click.option("--gpio", type=click.Choice(["gpiozero", "rpi"]), default="gpiozero",
              show_default=True, help="GPIO library for the keys.")
@click.option("--serial", "serial_port", help="Reach the hub through a bridge on this serial "
              "port instead of the network (overrides the board file's uplink).")
@click.option("--baud", type=int, default=None, help="Serial speed [board file, else 115200].")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(LEVELS))
@click.option("--json", "as_json", is_flag=True, help="Print the counters as JSON on exit.")
def run(config_path, board_path, state_dir, display_name, gpio, serial_port, baud, log_level,
        as_json):
    """Run the Pi evaluator until SIGTERM (systemd) or Ctrl-C."""
    from firmware.evaluator import config as configlib
    from firmware.evaluator.journal import Journal, JournalError

    from . import board as boardlib
    from .runtime import Evaluator
    from .serialport import ReopeningPort
    from .systemd import Notifier
    from .transport import MqttTransport, SerialTransport, client_cert_files, tls_context

    _logging(log_level)
    log = logging.getLogger("pingjia.agent")
    try:
        config = configlib.load(config_path)
    except configlib.ConfigError as exc:
        raise AgentError("%s: %s" % (config_path, exc)) from None
    spec = boardlib.load_spec(board_path)
    state_dir = (state_dir or "").split(":")[0] or os.path.dirname(os.path.abspath(config_path))
    os.makedirs(state_dir, exist_ok=True)
    lock = _lock(state_dir)
    folder, segments, segment_bytes = boardlib.journal_geometry(spec, state_dir)
    try:
        journal = Journal(folder, segments=segments, segment_bytes=segment_bytes,
                          seq_floor=config.seq_floor)
    except (JournalError, OSError) as exc:
        raise AgentError("journal %s: %s" % (folder, exc)) from None
    uplink = dict(spec.get("uplink", {"kind": "mqtt"}))
    if serial_port:
        uplink = {"kind": "serial", "port": serial_port}
    if uplink["kind"] == "serial":
        port = ReopeningPort(uplink["port"], baud or uplink.get("baud", 115200), timeout=0)
        transport = SerialTransport(config, port)
    else:
        tls = None
        if config.tls:
            cert, key = client_cert_files(config, state_dir)
            tls = tls_context(config.ca, cert, key)
        transport = MqttTransport(config, tls=tls)
    board = boardlib.open_board(spec, gpio=gpio, display_name=display_name, log=log)
    evaluator = Evaluator(config, board, journal, transport)
    notifier = Notifier()
    stop = _stop_on_signals()
    log.info("evaluator %s: board %s, display %s, journal %s (next seq %d, %d unacked), "
             "hub via %s", config.device_id, board.name,
             board.display_spec.get("driver") if board.display is not None else "none",
             folder, journal.next_seq, journal.depth,
             uplink.get("port") if uplink["kind"] == "serial"
             else "%s:%d" % (config.hub_host, config.hub_port))
    notifier.ready("evaluator %s" % config.device_id)
    try:
        evaluator.run(stop, watchdog=notifier.watchdog)
    finally:
        notifier.stopping()
        board.close()
        os.close(lock)
    if as_json:
        click.echo(json.dumps(evaluator.stats(), sort_keys=True))


@agent.command()
@click.option("--port", "-p", "port_name", required=True,
              help="Serial port of the evaluator (/dev/ttyUSB0, /dev/ttyACM0, COM3).")
@click.option("--config", "-c", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Bridge config (JSON): hub_host, hub_port, tls, ca; optional device_id.")
@click.option("--baud", type=int, default=115200, show_default=True)
@click.option("--link-timeout", type=float, default=5.0, show_default=True,
              help="Seconds without a frame before the device counts as gone.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(LEVELS))
@click.option("--json", "as_json", is_flag=True, help="Print the counters as JSON on exit.")
def bridge(port_name, config_path, baud, link_timeout, log_level, as_json):
    """Relay a serial evaluator to the hub over this PC's network, as the device itself."""
    from .bridge import Bridge, BridgeConfig
    from .serialport import ReopeningPort
    from .systemd import Notifier

    _logging(log_level)
    config = BridgeConfig.load(config_path)
    if link_timeout <= 0:
        raise AgentError("--link-timeout: must be > 0")
    port = ReopeningPort(port_name, baud, timeout=0.05)
    relay = Bridge(port, config, link_timeout_s=link_timeout)
    notifier = Notifier()
    stop = _stop_on_signals()
    notifier.ready("bridge on %s" % port_name)
    try:
        relay.run(stop, watchdog=notifier.watchdog)
    finally:
        notifier.stopping()
    if as_json:
        click.echo(json.dumps(relay.stats(), sort_keys=True))


@agent.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON list.")
def ports(as_json):
    """List the serial ports of this machine (to find the evaluator's)."""
    from serial.tools import list_ports

    found = [{"port": p.device, "description": p.description, "hwid": p.hwid}
             for p in sorted(list_ports.comports(), key=lambda p: p.device)]
    if as_json:
        click.echo(json.dumps(found, ensure_ascii=False))
        return
    if not found:
        click.echo("no serial ports found")
    for p in found:
        click.echo("%s\t%s\t%s" % (p["port"], p["description"], p["hwid"]))
