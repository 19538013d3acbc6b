"""`salfctl eval` at scale (issue 22, item 7): the feature pass of training/quality/protocols/features.py
streams a DataLoader into preallocated outputs on the model's device, ``--train-limit`` is a seeded
class-mixed draw, and under torchrun each rank computes its share and every rank gets every item.

Real tensors throughout: a random tiny SALF-CBM bundle (tests/fixtures/bundles.py) over the small
synthetic set (the ``synth_data`` fixture). Tolerances are 1e-6 relative to each output's scale (the
random backbone's pooled features are ~1e-4): CPU kernels are not batch-invariant (a batch of 5 and one
of 96 differ by ~1e-7 of the scale here), so results computed in other batches are close, not bitwise."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures.bundles import make_random_bundle

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("pooled", "scores", "logits")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A random bundle with the synthetic set's 8 classes (the heads are fitted on its labels)."""
    return make_random_bundle(tmp_path_factory.mktemp("scale") / "bundle", num_classes=8)


@pytest.fixture(scope="module")
def model(bundle):
    from training.bundle import load_bundle

    return load_bundle(bundle)[0]


@pytest.fixture()
def one_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def _split(data, model, split="train"):
    from training.data.folder import ImageFolderSplit

    return ImageFolderSplit(data, split, model.backbone.spec.input_size)


@torch.no_grad()
def _reference(model, dataset, indices):
    """The straightforward pass: every image stacked into one batch."""
    from training.model import normalize_uint8, pooled_features

    spec = model.backbone.spec
    items = [dataset[i] for i in indices]
    feats = model.backbone(normalize_uint8(torch.stack([im for im, _ in items]), spec.mean, spec.std))
    scores, logits = model.head(model.cbl(feats))
    return pooled_features(feats, model.grid), scores, logits, torch.tensor([int(y) for _, y in items])


@torch.no_grad()
def _previous(model, dataset, batch_size):
    """dataset_features as it was before it streamed (lists of batches, then torch.cat)."""
    from training.model import normalize_uint8, pooled_features

    spec = model.backbone.spec
    pooled, scores, logits, labels = [], [], [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        feats = model.backbone(normalize_uint8(torch.stack([im for im, _ in items]), spec.mean, spec.std))
        pooled.append(pooled_features(feats, model.grid))
        s, lg = model.head(model.cbl(feats))
        scores.append(s)
        logits.append(lg)
        labels += [int(y) for _, y in items]
    return torch.cat(pooled), torch.cat(scores), torch.cat(logits), torch.tensor(labels)


def _assert_close(got, want, what=""):
    for name, g, w in zip(NAMES, got[:3], want[:3]):
        assert g.shape == w.shape and g.dtype == w.dtype and g.device.type == "cpu", (what, name)
        scale = float(w.abs().max())
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6 * scale, msg=f"{what} {name}")
    assert torch.equal(got[3], want[3]) and got[3].dtype == torch.int64, what


def test_streaming_pass_equals_the_stacked_reference(model, synth_data, one_process):
    from training.quality.protocols.features import dataset_features

    train = _split(synth_data, model)
    want = _reference(model, train, range(len(train)))
    for workers in (0, 2):  # 96 images in batches of 5: the last batch is short
        _assert_close(dataset_features(model, train, batch_size=5, num_workers=workers), want, f"workers={workers}")
    # one process batches as before: the numbers are the previous implementation's, bit for bit
    got = dataset_features(model, train, batch_size=5)
    assert all(torch.equal(a, b) for a, b in zip(got, _previous(model, train, 5)))
    # explicit indices come back in their own order
    order = [7, 3, 95, 0, 41]
    _assert_close(dataset_features(model, train, batch_size=2, indices=order), _reference(model, train, order))


def test_limit_is_a_seeded_class_mixed_draw(model, synth_data, one_process):
    from training.quality.protocols.features import dataset_features
    from training.quality.protocols.localisation import sample

    train = _split(synth_data, model)  # 8 classes x 12 images, sorted by class
    first = dataset_features(model, train, batch_size=4, limit=24, seed=3)
    again = dataset_features(model, train, batch_size=4, limit=24, seed=3)
    other = dataset_features(model, train, batch_size=4, limit=24, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the same seed, the same subset
    drawn = sample(train, 24, 3)
    assert drawn != list(range(24)) and drawn != sample(train, 24, 4)
    assert first[3].tolist() == [train.labels[i] for i in drawn]
    assert len(set(first[3].tolist())) >= 5  # the first 24 files would be 2 classes only
    assert other[3].tolist() == [train.labels[i] for i in sample(train, 24, 4)]
    _assert_close(first, _reference(model, train, drawn))
    with pytest.raises(ValueError, match="not both"):
        dataset_features(model, train, limit=3, indices=[0, 1, 2])


def test_run_eval_fits_on_the_train_limit_draw(bundle, model, synth_data, one_process, monkeypatch):
    """run_eval's ``train_limit``: the features handed to the heads are those of the seeded draw, and the
    concept neurons are told which train images they are."""
    from training.quality.protocols import run
    from training.quality.protocols.localisation import sample

    class Stop(Exception):
        pass

    seen = {}

    def classification(model_, f_train, f_test, num_classes, f_val=None):
        seen.update(f_train=f_train, f_test=f_test, f_val=f_val, device=next(model_.parameters()).device)
        raise Stop

    monkeypatch.setattr(run, "classification", classification)
    with pytest.raises(Stop):
        run.run_eval(bundle, synth_data, limit=4, baselines=(), seed=3, train_limit=20, device="cpu")
    train = _split(synth_data, model)
    drawn = sample(train, 20, 3)
    assert len(set(seen["f_train"][3].tolist())) >= 4
    _assert_close(seen["f_train"], _reference(model, train, drawn))
    assert len(seen["f_test"][0]) == 48 and len(seen["f_val"][0]) == 32 and seen["device"].type == "cpu"
    if not torch.cuda.is_available():  # asking for CUDA without it is named before any work
        with pytest.raises(ValueError, match="CUDA is not available"):
            run.run_eval(bundle, synth_data, device="cuda")


def test_salfctl_eval_names_a_bad_device(bundle, synth_data):
    from typer.testing import CliRunner

    from clients.salfctl import app

    res = CliRunner().invoke(app, ["eval", str(bundle), "--data", str(synth_data), "--device", "bogus"])
    assert res.exit_code == 2 and "--device 'bogus'" in res.output


# --------------------------------------------------------------------------------------------- two ranks
SCRIPT = """
import json, os, sys
import torch
from training.bundle import load_bundle
from training.data.folder import ImageFolderSplit
from training.distributed import distributed_context
from training.quality.protocols import run
from training.quality.protocols.features import dataset_features

mode, bundle, data, out = sys.argv[1:5]
model, meta = load_bundle(bundle)
seen = []  # images each backbone call of this rank saw
model.backbone.register_forward_hook(lambda m, inputs, output: seen.append(int(inputs[0].shape[0])))
test = ImageFolderSplit(data, "test", meta.backbone.input_size)
if mode == "own":  # no process group yet: dataset_features makes one and destroys it
    full = dataset_features(model, test, batch_size=5)
    assert not torch.distributed.is_initialized()
    torch.save({"full": full, "seen": seen}, f"{out}/own{os.environ['RANK']}.pt")
    sys.exit(0)

# one group for the whole script, as salfctl eval holds one for run_eval's passes (a process that makes
# and destroys several groups under torchrun races on the launcher's store)
rank, world, created = distributed_context()
full = dataset_features(model, test, batch_size=5)
drawn = dataset_features(model, test, batch_size=5, limit=13, seed=1)  # 13 items: 7 and 6
torch.save({"full": full, "drawn": drawn, "seen": seen, "rank": rank, "world": world}, f"{out}/rank{rank}.pt")

class Stop(Exception):
    pass

def classification(model, f_train, f_test, num_classes, f_val=None):
    torch.save({"f_train": f_train, "f_test": f_test}, f"{out}/eval{rank}.pt")
    raise Stop

run.classification = classification
try:
    doc = run.run_eval(bundle, data, limit=4, baselines=(), seed=0, train_limit=20, device="cpu")
    result = "returned None" if doc is None else "returned a document"
except Stop:
    result = "ran the protocols"
json.dump(result, open(f"{out}/eval{rank}.json", "w"))
if created:
    torch.distributed.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, *args) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}  # gloo on the CPU
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), *map(str, args)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]


def test_two_ranks_share_the_pass_and_each_gets_every_item(bundle, model, synth_data, tmp_path, one_process):
    """torchrun, 2 gloo ranks holding one process group: rank r encodes the items at positions p % 2 == r
    (counted through a hook on the backbone) and both ranks return the one-process outputs, in order; in
    run_eval rank 0 alone goes on to the protocols with the full features, rank 1 returns None."""
    from training.quality.protocols.features import dataset_features
    from training.quality.protocols.localisation import sample

    _torchrun(tmp_path, "held", bundle, synth_data, tmp_path)
    test = _split(synth_data, model, "test")
    full = dataset_features(model, test, batch_size=5)
    drawn = dataset_features(model, test, batch_size=5, limit=13, seed=1)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for r, got in enumerate(ranks):
        assert (got["rank"], got["world"]) == (r, 2)
        _assert_close(got["full"], full, f"rank {r} full")
        _assert_close(got["drawn"], drawn, f"rank {r} drawn")
        assert got["drawn"][3].tolist() == [test.labels[i] for i in sample(test, 13, 1)]
    # each rank encoded its own share only, in batches of 5: 48 = 24 + 24 test images, then 13 = 7 + 6 drawn
    for r, got in enumerate(ranks):
        assert got["seen"] == [5, 5, 5, 5, 4, 5, 2 - r]
    # run_eval (its own model, so no hook): rank 0 goes on with every feature, rank 1 stops after the passes
    assert json.loads((tmp_path / "eval0.json").read_text()) == "ran the protocols"
    assert json.loads((tmp_path / "eval1.json").read_text()) == "returned None"
    assert not (tmp_path / "eval1.pt").exists()
    fed = torch.load(tmp_path / "eval0.pt")
    train = _split(synth_data, model)
    _assert_close(fed["f_train"], _reference(model, train, sample(train, 20, 0)), "run_eval train")
    _assert_close(fed["f_test"], full, "run_eval test")


def test_two_ranks_without_a_group_make_their_own(bundle, model, synth_data, tmp_path, one_process):
    """dataset_features called under torchrun with no process group: it makes one, gathers, destroys it."""
    from training.quality.protocols.features import dataset_features

    _torchrun(tmp_path, "own", bundle, synth_data, tmp_path)
    full = dataset_features(model, _split(synth_data, model, "test"), batch_size=5)
    for r in (0, 1):
        got = torch.load(tmp_path / f"own{r}.pt")
        _assert_close(got["full"], full, f"rank {r}")
        assert got["seen"] == [5, 5, 5, 5, 4]
