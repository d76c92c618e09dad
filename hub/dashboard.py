"""The hall manager's dashboard: routes, login sessions, live updates (filled in below)."""


def setup_dashboard(app, settings, clock=None, health=None):
    """Add the dashboard and /metrics routes to the hub's aiohttp app."""
    return None
