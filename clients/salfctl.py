"""`salfctl`: one CLI for train / export / serve / predict / explain / intervene / rules.

Sub-apps come from each package; every module imports its heavy dependencies (torch, onnx,
onnxruntime) inside its commands, so client commands start fast and without torch.
"""
import typer

app = typer.Typer(help="SALF-CBM: train, export, serve and query spatially-aware concept bottleneck models.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def _mount() -> None:
    from training.cli import data_app, train_app

    app.add_typer(train_app, name="train")
    app.add_typer(data_app, name="data")
    for module_name in ("export.cli", "serving.cli", "clients.commands"):
        module = __import__(module_name, fromlist=["register"])
        module.register(app)


_mount()


def main() -> None:
    app()
