"""`salfctl`: one CLI for train / export / serve / predict / explain / intervene / rules."""
import typer

app = typer.Typer(help="SALF-CBM: train, export, serve and query spatially-aware concept bottleneck models.",
                  no_args_is_help=True)


def main() -> None:
    app()
