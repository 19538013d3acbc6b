"""Commands of this part for `salfctl` (see training/cli.py)."""
import typer


def register(train_app: typer.Typer, data_app: typer.Typer) -> None:
    """Add this part's commands to the `train` and `data` apps."""
