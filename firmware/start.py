# The app's entry on a real counter evaluator (ESP32-S3): the module the boot selector
# (/main.py, firmware/bootsel.py) imports from the app slot it mounted at /rom. It is part of
# the firmware image, so an update over the air replaces it with the rest. It builds the
# board from /board.json, loads /config.json, opens the journal on flash, joins the hall
# Wi-Fi and hands everything to the App (app.py), which runs forever.
import asyncio
import gc

from board.esp32s3 import Board, load_spec
from evaluator import config as device_config
from evaluator.journal import Journal
from evaluator.rating import Rating
from app import App

WATCHDOG_MS = 30000  # the app feeds it on every key scan; a hung loop resets the unit


def _der(pem):
    # mbedTLS wants DER here; the hall CA travels as PEM in config.json.
    from binascii import a2b_base64

    body = "".join(line for line in pem.split("\n") if line and not line.startswith("-----"))
    return a2b_base64(body)


def tls_context(cfg):
    """The TLS context for the hall broker (hall CA; client certificate when issued)."""
    if not cfg.tls:
        return None
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # MicroPython's client default is CERT_NONE (older releases had no verification).
    ctx.verify_mode = ssl.CERT_REQUIRED  # type: ignore[attr-defined]  # missing in the stubs
    ctx.load_verify_locations(cadata=_der(cfg.ca))
    cert = cfg.extra.get("client_cert")
    key = cfg.extra.get("client_key")
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


async def main():
    spec = load_spec()
    cfg = device_config.load("/config.json")
    board = Board(spec)
    flash = spec.get("flash") or {}
    journal = Journal(flash.get("journal_dir", "/journal"), flash.get("journal_segments", 16),
                      flash.get("segment_bytes", 4096), sync=board.fs_sync,
                      seq_floor=cfg.seq_floor)
    spec = None
    gc.collect()
    if cfg.wifi_ssid:
        # The station keeps reconnecting by itself after this; the app starts either way
        # and its MQTT client retries until the network is there.
        await board.connect_wifi(cfg.wifi_ssid, cfg.wifi_password)
    app = App(board, cfg, Rating(), journal, ssl=tls_context(cfg))
    board.start_watchdog(WATCHDOG_MS)
    await app.run()


asyncio.run(main())
