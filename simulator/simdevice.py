# Entry script of one simulated counter evaluator (MicroPython unix port).
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

from simboard import SimBoard
from evaluator import config as device_config
from evaluator.journal import Journal
from evaluator.rating import Rating
from app import App


def _board_spec(name):
    with open(name) as f:
        return json.load(f)


async def _run(board, app):
    board.start()
    await app.run()


def main():
    args = sys.argv[1:]
    ctl_port = int(args[0]) if args else 0
    rst = args[1] if len(args) > 1 else "power"
    cfg = device_config.load("config.json")
    spec = _board_spec(cfg.board or "board.json")
    board = SimBoard(spec, cfg.device_id, ctl_port, ".", rst)
    spec = None
    gc.collect()  # parsing garbage gone before the long-lived buffers are allocated
    journal = Journal(board.journal_dir, board.journal_segments, board.segment_bytes,
                      sync=board.fs_sync, seq_floor=cfg.seq_floor)
    app = App(board, cfg, Rating(), journal)
    board.app = app
    asyncio.run(_run(board, app))


main()
