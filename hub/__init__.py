"""The hall hub: broker supervision, durable ingest, acks, forwarding to the province."""


class PingjiaError(Exception):
    """Base of every error the CLI turns into a one-line message."""
