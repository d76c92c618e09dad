"""`pingjia hub devices`, `pingjia hub device ID`, `pingjia hub managers …` (filled in below)."""


def register(group):
    """Add the device-health and manager commands to the `pingjia hub` group."""
