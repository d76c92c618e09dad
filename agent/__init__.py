"""CPython side of devices: the Raspberry Pi evaluator and the serial bridge."""
from hub import PingjiaError


class AgentError(PingjiaError):
    """The Pi evaluator or the serial bridge cannot start or run as configured."""
