# Entry script of one simulated counter evaluator (MicroPython unix port): the module the
# boot selector (firmware/bootsel.py) imports from the app slot it mounted at /rom, as a
# board's imports `start` (simulator/fleet.py launches it; docs/firmware.md, "Updates over
# the air"). Without the launcher, from a build folder:
#
#   MICROPYPATH=.frozen:<build> micropython -X heapsize=64K -m simdevice <ctl_port> [reset_cause]
#
# run with the device's own directory as the working directory: config.json (from
# provisioning) and board.json (hardware/boards/sim.json) live there, and the journal
# directory the board names is created there -- the device's flash. The same App as on a
# real board runs on top of simboard.SimBoard; killing this process is a power cut.
import gc
import sys
import json

import asyncio


def _boot(args):
    # Everything only boot needs stays local to this function, and the config loader is
    # dropped once it has checked config.json: the heap keeps only what the app runs on.
    from evaluator import config as device_config
    from simboard import SimBoard

    cfg = device_config.load("config.json")
    with open(cfg.board or "board.json") as f:
        spec = json.load(f)
    board = SimBoard(spec, cfg.device_id, int(args[0]) if args else 0, ".",
                     args[1] if len(args) > 1 else "power")
    fields = {"device_id": cfg.device_id, "key": cfg.key, "hub_host": cfg.hub_host,
              "hub_port": cfg.hub_port, "mqtt_user": cfg.mqtt_user,
              "mqtt_password": cfg.mqtt_password, "qr": cfg.extra.get("qr")}
    return board, fields, cfg.seq_floor


def main():
    board, fields, seq_floor = _boot(sys.argv[1:])
    sys.modules.pop("evaluator.config", None)
    import evaluator
    if hasattr(evaluator, "config"):
        del evaluator.config
    gc.collect()  # boot garbage gone before the long-lived buffers are allocated
    from evaluator.journal import Journal
    from evaluator.rating import Rating
    from app import App

    journal = Journal(board.journal_dir, board.journal_segments, board.segment_bytes,
                      sync=board.fs_sync, seq_floor=seq_floor)
    app = App(board, fields, Rating(), journal)
    fields = None
    board.app = app
    gc.collect()
    board.start()
    asyncio.run(app.run())


main()
