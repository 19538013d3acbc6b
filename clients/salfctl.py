"""`salfctl`: one CLI for train / export / serve / predict / explain / intervene / rules.

Each part owns its commands (``training/cli.py``, ``export/cli.py``, ``serving/cli.py``,
``clients/commands/``) and registers them with ``salf.cli.command``; the conventions they share
(exit codes, options, the error boundary, logging) are in ``salf/cli.py``. Command modules import
their heavy dependencies (torch, onnx, onnxruntime) inside the commands, so client commands start fast
and without torch.
"""
import typer

from clients import commands as client_commands
from salf.cli import configure_logging
from clients.ui import cli as ui_cli
from export import cli as export_cli
from serving import cli as serving_cli
from training.cli import data_app, train_app
from training.quality import cli as eval_cli

# Commands whose output is their result (tables, JSON, a one-line summary): their INFO logs would only
# repeat it, so they log warnings unless -v. Pipelines (train, export, serve, triton) log progress at INFO.
RESULT_COMMANDS = frozenset({*client_commands.COMMANDS, "data", "ui"})

app = typer.Typer(help="SALF-CBM: train, export, serve and query spatially-aware concept bottleneck models.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def root(ctx: typer.Context,
         verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log output (-vv: libraries too)."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only.")) -> None:
    """Logging is configured here, once for every command (salf/cli.py)."""
    configure_logging(verbose - int(quiet), quiet_default=ctx.invoked_subcommand in RESULT_COMMANDS)


app.add_typer(train_app, name="train")
app.add_typer(data_app, name="data")
export_cli.register(app)
serving_cli.register(app)
client_commands.register(app)
ui_cli.register(app)
eval_cli.register(app)


def main() -> None:
    app()
