"""`pingjia sim …` and `pingjia province …`."""
import click


@click.group()
def sim():
    """Run simulated devices and citizens against a real broker and hub."""


@click.group()
def province():
    """The reference provincial 好差评 receiver."""


def _register_province():
    from simulator.province_cli import register

    register(province)


_register_province()
