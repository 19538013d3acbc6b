"""Offline batch scoring: `salfctl predict DIR` / `explain DIR` walk folders, keep requests in flight,
stream JSON Lines to --output in input order, and --resume a stopped run without redoing its images."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.fixtures.gateway import encode, sample_image

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def salfctl(*args):
    from clients.salfctl import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """12 images in two sub-folders (same file names in both), a text file, and one broken image."""
    root = tmp_path_factory.mktemp("scoring") / "images"
    for sub in ("a", "b"):
        (root / sub).mkdir(parents=True)
        for k in range(6):
            (root / sub / f"{k:02d}.png").write_bytes(encode(sample_image(k + (10 if sub == "b" else 0))))
    (root / "notes.txt").write_text("not an image")
    (root / "b" / "zz-broken.png").write_bytes(b"\x89PNG broken")
    return root


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_folder_streams_rows_in_order_with_errors(embedded_gateway, folder, tmp_path):
    out = tmp_path / "scores.jsonl"
    r = salfctl("predict", folder, "-u", embedded_gateway.url, "--output", out, "--in-flight", "4", "-k", "2")
    assert r.exit_code == 1  # the broken file is a failed request
    rows = _rows(out)
    expected = sorted(p for p in folder.rglob("*.png"))
    assert [row["image"] for row in rows] == [str(p) for p in expected]
    assert [row["image"] for row in rows if "error" in row] == [str(folder / "b" / "zz-broken.png")]
    assert all(len(row["classes"]) == 2 for row in rows if "error" not in row)
    assert r.stdout == ""  # rows went to the file

    # one at a time gives the same answers
    one = tmp_path / "one.jsonl"
    salfctl("predict", folder, "-u", embedded_gateway.url, "--output", one, "--in-flight", "1", "-k", "2")
    assert _rows(one) == rows


def test_resume_after_a_stop_redoes_only_what_is_missing(embedded_gateway, folder, tmp_path):
    full = tmp_path / "full.jsonl"
    salfctl("predict", folder, "-u", embedded_gateway.url, "--output", full)
    rows = _rows(full)

    # a run stopped after 5 rows, killed in the middle of the 6th
    out = tmp_path / "stopped.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:5]) + lines[5][:20])
    r = salfctl("predict", folder, "-u", embedded_gateway.url, "--output", out)
    assert r.exit_code == 2 and "--resume" in r.stderr  # never appended to by accident
    r = salfctl("predict", folder, "-u", embedded_gateway.url, "--output", out, "--resume")
    assert "5 of 13 images already answered" in r.stderr
    resumed = _rows(out)
    assert len(resumed) == 13  # the partial row is gone, the rest done once
    assert sorted(resumed, key=lambda x: x["image"]) == sorted(rows, key=lambda x: x["image"])

    # resuming a finished run retries only the failed image
    r = salfctl("predict", folder, "-u", embedded_gateway.url, "--output", out, "--resume")
    assert "12 of 13 images already answered" in r.stderr
    assert len(_rows(out)) == 14 and r.exit_code == 1


def test_explain_folder_writes_distinct_figures(embedded_gateway, folder, tmp_path):
    out = tmp_path / "figures"
    rows = tmp_path / "explain.jsonl"
    r = salfctl("explain", folder / "a", folder / "b", "-u", embedded_gateway.url, "--out", out, "--output", rows,
                "-k", "2", "--in-flight", "3")
    assert r.exit_code == 1  # the broken one
    done = [row for row in _rows(rows) if "error" not in row]
    assert len(done) == 12
    figures = sorted(p.name for p in out.glob("*.png"))
    assert len(figures) == 12 and "a__00.png" in figures and "b__00.png" in figures


def test_usage_errors(embedded_gateway, folder, tmp_path):
    r = salfctl("predict", folder, "-u", embedded_gateway.url, "--resume")
    assert r.exit_code == 2 and "--resume needs --output" in r.stderr
    r = salfctl("predict", folder, "-u", embedded_gateway.url, "--in-flight", "0")
    assert r.exit_code == 2 and "--in-flight" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = salfctl("predict", empty, "-u", embedded_gateway.url)
    assert r.exit_code == 2 and "holds" in r.stderr  # (rich wraps the message in a box)
