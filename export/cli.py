"""Commands of this part for `salfctl` (see clients/salfctl.py)."""
import typer


def register(app: typer.Typer) -> None:
    """Add this part's commands to the top-level `salfctl` app."""
