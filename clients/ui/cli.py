"""`salfctl ui`: the interactive explorer (clients/ui/app.py) on a local port."""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional

import typer

from salf.cli import DEFAULT_REPO, DEFAULT_TIMEOUT, EXIT_USAGE, CaCert, CliError, Repo, Timeout, Token, Url, command


def ui(images: Optional[Path] = typer.Option(None, "--images", exists=True, file_okay=False,
                                             help="A folder of images to pick from; also the concept gallery's "
                                                  "images (its first use explains each image once)."),
       host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Loopback by default; another "
                                                            "address exposes the explorer to that network "
                                                            "(the launch secret still guards it)."),
       port: int = typer.Option(8080, "--port", help="Port (0: a free one)."),
       secret: Optional[str] = typer.Option(None, "--secret", envvar="SALF_UI_SECRET",
                                            help="Launch secret (default: a new random one each launch)."),
       open_browser: bool = typer.Option(False, "--open", help="Open the page in the default browser."),
       url: Url = None, model_repository: Repo = DEFAULT_REPO, timeout: Timeout = DEFAULT_TIMEOUT,
       token: Token = None, ca_cert: CaCert = None) -> None:
    """Interactive explorer in the browser: open an image, see its prediction and concept heatmaps, draw a
    region and ask what the model sees there (Explain Anything), edit concepts in it and watch the class
    scores change (local intervention), read the class rules, browse a concept's gallery.

    Prints the page's URL with its per-launch secret and serves until Ctrl-C. The gateway's --token stays
    in this process; the page never sees it."""
    from ..commands.connect import connect
    from .app import ExplorerServer
    from .session import Explorer

    if secret is not None and len(secret) < 16:
        raise CliError("--secret must be at least 16 characters (or leave it out for a random one)", EXIT_USAGE)
    client = connect(url, model_repository, timeout, token, ca_cert)
    try:
        try:
            server = ExplorerServer(Explorer(client, images), host, port, secret)
        except OSError as exc:
            raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", EXIT_USAGE) from exc
        typer.echo(f"SALF-CBM explorer on {client.info.backend} backend, model version {client.info.model_version}"
                   f" ({len(client.info.concepts)} concepts, {len(client.info.classes)} classes)", err=True)
        typer.echo(f"open {server.url}", err=True)
        print(server.url, flush=True)  # stdout: the one line a script reads
        if open_browser:
            import webbrowser

            webbrowser.open(server.url)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        server.start()
        stop.wait()
        server.shutdown()
        server.server_close()
    finally:
        client.close()


def register(app: typer.Typer) -> None:
    command(app, "ui")(ui)
