"""`salfctl train ...` and `salfctl data ...`. Heavy imports happen inside the commands.

Each part registers its own commands here through a ``register(train_app, data_app)`` function:
``training/data/cli.py`` (synthetic data), ``training/commands.py`` (backbone/cbl/head/all),
``training/clip/cli.py`` (concepts/similarities).
"""
import typer

from . import commands
from .clip import cli as clip_cli
from .data import cli as data_cli

train_app = typer.Typer(help="Train a SALF-CBM: backbone, concepts, similarities, cbl, head, or all.",
                        no_args_is_help=True)
data_app = typer.Typer(help="Datasets: generate the synthetic test bed.", no_args_is_help=True)


for _module in (data_cli, commands, clip_cli):
    _module.register(train_app, data_app)
