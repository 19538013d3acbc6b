"""`salfctl train all` with CLIP supervision (similarity.source "clip") on the synthetic dataset."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.fixtures.clip import quick_clip_preset

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_train_all_with_clip_source(synth_data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", "from clients.salfctl import main; main()", "train", "all",
           "--config", str(quick_clip_preset(tmp_path)), "--data", str(synth_data), "--out", str(run)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]

    manifest = json.loads((run / "similarities" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["spec"]["num_images"] == 96 and manifest["spec"]["grid"] == [7, 7]
    assert manifest["spec"]["radius"] == 16 and manifest["spec"]["model"] == "salf-tiny-clip-112"
    kept = (run / "concepts" / "concepts.txt").read_text().split("\n")[:-1]
    concept_report = json.loads((run / "concepts" / "report.json").read_text())
    assert concept_report["kept"] == len(kept) and concept_report["initial"] == 19
    bundle = json.loads((run / "bundle" / "bundle.json").read_text())
    assert bundle["concepts"] and set(bundle["concepts"]) <= set(kept)
    assert "salf-tiny-clip-112" in json.dumps(bundle)

    # The same P the CBL was trained on can be rebuilt from the cache (never stored on disk).
    from training.clip.pipeline import build_clip_source
    from training.config import load_config

    cfg = load_config(str(tmp_path / "tiny-clip-quick.json"))
    source, concepts = build_clip_source(cfg, synth_data, run)  # resumes: everything is already there
    assert concepts == kept
    p = source.similarities([0, 95])
    assert p.shape == (2, len(kept), 7, 7) and torch.isfinite(p).all() and float(p.abs().max()) <= 1.0 + 1e-3
    assert not any(f.name.startswith("P") for f in (run / "similarities").iterdir())

    # The class-concept mode (paper 4.2) on the same cache: one prompt per class, no filter drops any.
    from training.data.world import CLASS_NAMES

    cfg.similarity.class_concepts = "An image of a {class}"
    source, concepts = build_clip_source(cfg, synth_data, run)
    assert concepts == [f"An image of a {c.replace('_', ' ')}" for c in CLASS_NAMES] == source.concepts
    assert json.loads((run / "concepts" / "report.json").read_text())["filters"].startswith("skipped")
    assert source.similarities([0]).shape == (1, len(CLASS_NAMES), 7, 7)
