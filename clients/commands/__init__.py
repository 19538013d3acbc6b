"""Client commands of `salfctl`: predict, explain (with a region: Explain Anything), explain-region,
intervene, rules, info, monitor.

With ``-u/--url`` they talk to a gateway; without, they start one in this process on a local
``--model-repository``. Before sending anything they check the gateway's health, metadata and backend
readiness (STYLE 9). Every command takes the same path: connect -> one request per input -> a row per
result -> tables or JSON Lines -> exit code (salf/cli.py: 0 ok, 1 a request failed, 2 usage,
3 unreachable).

JSON rows are the response messages in protobuf's JSON mapping with the proto field names
(``json_format.MessageToDict``; heatmap bytes left out), plus the input's path under ``"image"`` and a
few conveniences named in each command's docstring.

This module is the registry (``COMMANDS``, :func:`register`); the path's steps are modules of their
own: ``connect`` (the checked client), ``inputs`` (folders expanded, output names), ``rows`` (requests
to rows, resumable output, tables or JSON Lines), ``regions`` (the region options); the commands are
``predict``, ``explain`` (with ``explain_video``), ``intervene``, ``model`` (rules, info) and ``monitor``.
"""
from __future__ import annotations

import typer

from salf.cli import command

from .explain import explain, explain_region
from .intervene import intervene
from .model import info, rules
from .monitor import monitor
from .predict import predict

COMMANDS = ("predict", "explain", "explain-region", "intervene", "rules", "info", "monitor")


def register(app: typer.Typer) -> None:
    """Add this part's commands to the top-level `salfctl` app."""
    for name, fn in zip(COMMANDS, (predict, explain, explain_region, intervene, rules, info, monitor)):
        command(app, name)(fn)
