"""CPython side of devices: the Raspberry Pi evaluator and the serial bridge."""
