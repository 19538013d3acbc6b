"""What the served model is: `salfctl rules` (each class's concept weights, optionally drawn) and
`salfctl info` (concepts, classes, grid, input size, backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from salf.cli import (DEFAULT_REPO, DEFAULT_TIMEOUT, EXIT_FAILED, EXIT_USAGE, CaCert, CliError, Json, Repo, Timeout,
                      Token, Url)

from .rows import message_dict, rich_table, run


def rules(class_name: Optional[str] = typer.Option(None, "--class", help="Only this class."),
          plot: Optional[Path] = typer.Option(None, "--plot", dir_okay=False,
                                              help="Also draw the rules to this PNG: concepts -> classes, width by "
                                                   "|weight|, green positive, red negative (paper Fig. 3)."),
          max_classes: int = typer.Option(20, "--max-classes", help="Classes drawn by --plot."),
          force: bool = typer.Option(False, "--force", help="Overwrite --plot's file."),
          url: Url = None, model_repository: Repo = DEFAULT_REPO, timeout: Timeout = DEFAULT_TIMEOUT,
          token: Token = None, ca_cert: CaCert = None, as_json: Json = False) -> None:
    """Global decision rules: each class's non-zero concept weights, largest |weight| first
    (JSON: one ClassRule per line, plus "class", its name)."""
    import grpc

    if plot is not None and plot.exists() and not force:
        raise CliError(f"{plot} already exists: pass --force to overwrite it", EXIT_USAGE)

    def table(console, row):
        console.print(rich_table(f"{row['class']} (bias {row['bias']:+.4f}, {len(row['terms'])} concepts)",
                                 ("concept", "weight"),
                                 [(t["concept_name"], f"{t['weight']:+.4f}") for t in row["terms"]]))

    def produce(client):
        try:
            response = client.class_rules(class_name or "")
        except grpc.RpcError as exc:
            raise CliError(f"{exc.code().name}: {exc.details()}", EXIT_FAILED) from exc
        rows = [{"class": rule.class_name, **message_dict(rule)} for rule in response.rules]
        if plot is not None:
            from salf.figures import rules_figure

            plot.parent.mkdir(parents=True, exist_ok=True)
            shown = min(len(rows), max_classes)
            rules_figure([(r["class"], [(t["concept_name"], t["weight"]) for t in r["terms"]]) for r in rows],
                         f"decision rules: {shown} of {len(rows)} classes", max_classes).save(plot)
            typer.echo(f"wrote {plot}", err=True)
        return rows

    run((url, model_repository, timeout, token, ca_cert), as_json, table, produce)


def info(url: Url = None, model_repository: Repo = DEFAULT_REPO, timeout: Timeout = DEFAULT_TIMEOUT,
         token: Token = None, ca_cert: CaCert = None, as_json: Json = False) -> None:
    """The served model: concepts, classes, grid, input size, backend (JSON: ModelInfo plus "grid" and
    "input_size" as [height, width])."""
    def table(console, row):
        from rich.table import Table

        t = Table(title="model", show_header=False)
        for key, value in row.items():
            t.add_row(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
        console.print(t)

    def produce(client):
        i = client.info
        return [{**message_dict(i), "input_size": [i.input_height, i.input_width],
                 "grid": [i.grid_height, i.grid_width]}]

    run((url, model_repository, timeout, token, ca_cert), as_json, table, produce)
