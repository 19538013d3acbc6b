"""The README's first command, `make demo`, run for real (on the small synthetic size) so it never rots.

`make test` cannot run itself; CI runs it on a fresh clone (`.ci/run`).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.gateway import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_make_demo_trains_exports_serves_and_explains(tmp_path):
    demo, repo = tmp_path / "demo", tmp_path / "model_repository"
    cmd = ["make", "-C", str(ROOT), "demo", f"DEMO={demo}", f"DEMO_REPO={repo}", f"DEMO_PORT={free_port()}",
           "DEMO_SYNTH_ARGS=--size small"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1150)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    report = json.loads((demo / "report.json").read_text())
    assert report["test_accuracy"] > 0.5, report  # 8 classes: chance is 0.125
    assert "test accuracy" in out and "dense" in out
    assert (repo / "salf_cbm" / "1" / "model.onnx").is_file() and (repo / "salf_head" / "config.pbtxt").is_file()
    # the gateway answered: the explanation table names the predicted class, the figures exist
    figures = sorted(p.name for p in (demo / "explain").glob("*.png"))
    assert figures == ["00000.png"], figures
    assert (demo / "rules.png").is_file()
    classes = (demo / "data" / "classes.txt").read_text().split()
    assert any(c in proc.stdout for c in classes)
