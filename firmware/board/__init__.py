# Board layers: the only firmware code that imports `machine` or `network`. Each module
# builds pins, buses, the display and the radio from a board file (hardware/boards/*.json,
# copied to the device as /board.json) and hands them to the portable app as one Board.
