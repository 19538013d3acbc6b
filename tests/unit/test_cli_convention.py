"""The salfctl convention (salf/cli.py): one error boundary, one set of option names, logging once."""
from __future__ import annotations

import logging
import time

import click
import pytest
import typer
from typer.testing import CliRunner

from salf import cli
from clients.salfctl import app

runner = CliRunner()


def _params(path: list[str]) -> dict[str, click.Parameter]:
    cmd = typer.main.get_command(app)
    ctx = click.Context(cmd)
    for name in path:
        cmd = cmd.get_command(ctx, name)
    return {p.name: p for p in cmd.params}


def test_boundary_maps_expected_errors_to_codes_and_keeps_bugs():
    sub = typer.Typer()

    class Expected(ValueError):
        pass

    @cli.command(sub, "ok-fail", errors=lambda: {Expected: cli.EXIT_FAILED})
    def ok_fail(kind: str = "expected") -> None:
        if kind == "expected":
            raise Expected("the bundle is not a bundle")
        if kind == "cli":
            cli.fail("bad flag", cli.EXIT_USAGE)
        raise KeyError("a bug")

    @cli.command(sub, "other")
    def other() -> None:
        pass

    r = runner.invoke(sub, ["ok-fail"])
    assert r.exit_code == 1 and "error: the bundle is not a bundle" in r.output and "Traceback" not in r.output
    r = runner.invoke(sub, ["ok-fail", "--kind", "cli"])
    assert r.exit_code == 2 and "error: bad flag" in r.output
    r = runner.invoke(sub, ["ok-fail", "--kind", "bug"])
    assert r.exit_code == 1 and isinstance(r.exception, KeyError)  # a bug is not dressed up as a message


@pytest.mark.parametrize("command", ["predict", "explain", "explain-region", "intervene", "rules", "info"])
def test_client_commands_share_one_option_set(command):
    params = _params([command])
    for name, flags in {"url": ["-u", "--url"], "model_repository": ["--model-repository", "-m"],
                        "timeout": ["--timeout"], "token": ["--token"], "ca_cert": ["--ca-cert"],
                        "as_json": ["--json"]}.items():
        assert params[name].opts == flags, (command, name)
        assert params[name].help == _params(["info"])[name].help
    assert params["url"].envvar == "SALF_URL" and params["token"].envvar == "SALF_TOKEN"


@pytest.mark.parametrize("command", ["explain", "explain-region", "intervene"])
def test_region_commands_take_the_same_region_options(command):
    params = _params([command])
    assert [params[n].opts for n in ("roi", "box", "point", "radius")] == [["--roi"], ["--box"], ["--point"],
                                                                          ["--radius"]]
    assert params["images"].nargs == -1  # several images, like the others


def test_token_option_is_the_same_for_serve_and_clients():
    assert _params(["serve"])["token"].opts == _params(["predict"])["token"].opts == ["--token"]


def test_usage_errors_come_before_any_gateway_starts(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"not used")
    start = time.monotonic()
    r = runner.invoke(app, ["explain-region", str(img), "--box", "1,2,3", "-m", str(tmp_path / "none")])
    assert r.exit_code == 2 and "--box must be x0,y0,x1,y1" in r.output
    r = runner.invoke(app, ["intervene", str(img), "--concept", "x", "--beta", "1", "-m", str(tmp_path / "none")])
    assert r.exit_code == 2 and "needs a region" in r.output
    assert time.monotonic() - start < 5


def test_logging_levels_follow_the_root_flags():
    runner.invoke(app, ["-v", "info", "-m", "/nonexistent"])
    assert logging.getLogger("serving").level == logging.DEBUG
    runner.invoke(app, ["info", "-m", "/nonexistent"])  # a result command: warnings only
    assert logging.getLogger("serving").level == logging.WARNING
    runner.invoke(app, ["export", "/nonexistent"])  # a pipeline: progress at INFO
    assert logging.getLogger("export").level == logging.INFO
