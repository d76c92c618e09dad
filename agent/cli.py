"""`pingjia agent …`."""
import click


@click.group()
def agent():
    """Linux-class evaluators and the serial bridge."""
