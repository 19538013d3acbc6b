"""The `salfctl` conventions, declared once for every part's commands.

On the ground floor (beside ``salf.contract``) because every stage's CLI uses them: training, export,
serving and the client commands import this module, and it imports only the standard library and typer.
`clients/salfctl.py` assembles the app.

- **Exit codes**: 0 success; 1 a request or an export failed; 2 bad command line, input or
  configuration; 3 the gateway (or its backend) is unreachable or not ready.
- **Errors**: every command is registered with :func:`command`, whose wrapper is the one error boundary:
  a :class:`CliError`, or an error type the part declares as expected, prints ``<prefix>: <message>`` on
  stderr and exits with its code; anything else is a bug and keeps its traceback.
- **Logging** is configured once, by the root command (``-v``/``-q``; :func:`configure_logging`): the
  project's loggers (``training``, ``export``, ``serving``, ``clients``, ``salf``) log at INFO for the
  pipelines (train, export, serve, triton) and WARNING for the commands whose output is their result
  (client commands, ``data``); ``-v`` adds DEBUG, ``-q`` keeps WARNING; other libraries stay at WARNING.
- **Shared options** (``Url``, ``Repo``, ``Timeout``, ``Token``, ``CaCert``, ``Json``, ``TopK``) are
  declared here as ``Annotated`` types, so each flag has one name, default and help text.
"""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated, Callable, Mapping, NoReturn, Optional

import typer

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

PROJECT_LOGGERS = ("training", "export", "serving", "clients", "salf")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# ------------------------------------------------------------------ shared options
Url = Annotated[Optional[str], typer.Option(
    "-u", "--url", envvar="SALF_URL",
    help="Gateway HOST:PORT. Without it, a gateway runs in-process on --model-repository.")]
Repo = Annotated[Path, typer.Option("--model-repository", "-m",
                                    help="Model repository (salf_model.json, head.safetensors, ONNX graphs).")]
Timeout = Annotated[float, typer.Option("--timeout", help="Deadline of each request, seconds.")]
Token = Annotated[Optional[str], typer.Option(
    "--token", envvar="SALF_TOKEN",
    help="Bearer token: clients send 'authorization: Bearer TOKEN'; `serve` requires it on every RPC but health.")]
CaCert = Annotated[Optional[Path], typer.Option("--ca-cert", help="PEM root certificate: connect with TLS.")]
Json = Annotated[bool, typer.Option("--json", help="JSON Lines on stdout (one object per result) instead of tables.")]
TopK = Annotated[int, typer.Option("--top-k", "-k", help="How many classes/concepts (0: the gateway's default, 5).")]
# The same switches as the root's, for placing after a subcommand (`salfctl train all ... -q`).
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info logs.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs of this project's code.")]
DEFAULT_REPO = Path("model_repository")
DEFAULT_TIMEOUT = 30.0


# ------------------------------------------------------------------ errors
class CliError(Exception):
    """A failure the user can act on: printed without a traceback, exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    raise CliError(message, code)


ErrorMap = Callable[[], Mapping[type, int]]  # imported lazily: heavy modules load only when a command runs


def _report(prefix: str, message: str, code: int) -> NoReturn:
    typer.echo(f"{prefix}: {message}", err=True)
    raise typer.Exit(code)


def command(app: typer.Typer, name: str, errors: ErrorMap | None = None, prefix: str = "error"):
    """Register the decorated function as ``app``'s command ``name`` behind the error boundary.

    ``errors()`` maps the part's expected exception types to exit codes (first match wins)."""
    def register(fn):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except CliError as exc:
                _report(prefix, str(exc), exc.code)
            except (typer.Exit, typer.Abort, typer.BadParameter):
                raise
            except Exception as exc:
                for kind, code in (errors() if errors else {}).items():
                    if isinstance(exc, kind):
                        _report(prefix, str(exc), code)
                raise
        app.command(name)(guarded)
        return fn
    return register


# ------------------------------------------------------------------ logging
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it per invocation)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


def configure_logging(verbosity: int = 0, quiet_default: bool = False, level: str | None = None) -> None:
    """Set the project's log level once (module docstring); ``level`` (e.g. ``serve --log-level``) wins."""
    root = logging.getLogger()
    if not root.handlers:  # like logging.basicConfig: an application (or pytest) that set up logging keeps it
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    if level is not None:
        ours = logging.getLevelName(level.upper())
        if not isinstance(ours, int):
            fail(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    elif verbosity > 0:
        ours = logging.DEBUG
    elif verbosity < 0 or quiet_default:
        ours = logging.WARNING
    else:
        ours = logging.INFO
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(ours)
    if verbosity > 1:
        root.setLevel(logging.INFO)
