"""`salfctl train similarities` (the multi-GPU path, here under torchrun with 2 gloo ranks) and then
`salfctl train all` on the same run folder: the cache records its grid placement, `train all` uses it, and a
cache of another placement is refused with the flag that fixes it (issue 22)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.clip import quick_clip_preset
from tests.fixtures.gateway import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

SALFCTL = Path(sys.executable).parent / "salfctl"


def _similarities(data: Path, preset: Path, run: Path, *extra: str, ranks: int = 1) -> subprocess.CompletedProcess:
    args = ["train", "similarities", "--data", str(data), "--out", str(run / "similarities"), "--config", str(preset),
            "--device", "cpu", *extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
                 "127.0.0.1", "--master_port", str(free_port())] if ranks > 1 else [])
    return subprocess.run([*launcher, str(SALFCTL), *args], capture_output=True, text=True, timeout=170)


def _train_all(data: Path, preset: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SALFCTL), "train", "all", "--config", str(preset), "--data", str(data), "--out",
                           str(run), *extra], capture_output=True, text=True, timeout=200)


def _shard_times(run: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (run / "similarities").glob("shard-*")}


def test_train_all_uses_the_cache_train_similarities_wrote_under_torchrun(synth_data, tmp_path):
    preset, run = quick_clip_preset(tmp_path), tmp_path / "run"
    res = _similarities(synth_data, preset, run, ranks=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cells placement" in res.stdout
    before = _shard_times(run)
    assert before

    res = _train_all(synth_data, preset, run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "0 to compute" in res.stderr  # every shard of the torchrun cache was reused as it was
    assert _shard_times(run) == before
    cbl = json.loads((run / "cbl" / "cbl.json").read_text())
    assert cbl["similarity"]["grid_placement"] == "cells"
    assert (run / "bundle" / "bundle.json").is_file()


def test_a_cache_of_another_placement_is_refused_with_the_flag_to_pass(synth_data, tmp_path):
    preset, run = quick_clip_preset(tmp_path), tmp_path / "run"
    res = _similarities(synth_data, preset, run, "--grid-placement", "stride")
    assert res.returncode == 0, res.stderr[-3000:]
    before = _shard_times(run)

    res = _train_all(synth_data, preset, run)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "built with grid placement 'stride'" in res.stderr and "--grid-placement stride" in res.stderr
    assert "Traceback" not in res.stderr
    assert _shard_times(run) == before  # nothing was thrown away

    res = _train_all(synth_data, preset, run, "--grid-placement", "stride")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _shard_times(run) == before
    assert json.loads((run / "cbl" / "cbl.json").read_text())["similarity"]["grid_placement"] == "stride"


def test_an_unknown_placement_is_a_usage_error(synth_data, tmp_path):
    preset, run = quick_clip_preset(tmp_path), tmp_path / "run"
    res = _similarities(synth_data, preset, run, "--grid-placement", "diagonal")
    assert res.returncode == 2 and "--grid-placement must be one of stride, cells" in res.stderr
    res = _train_all(synth_data, preset, run, "--grid-placement", "diagonal")
    assert res.returncode == 2 and "--grid-placement must be one of stride, cells" in res.stderr
