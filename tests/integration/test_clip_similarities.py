"""Similarity stage: resumable, checksummed prompt-embedding shards, multi-rank, and ``ClipSimilarity``."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.gateway import free_port
from tests.fixtures.kill import kill_after
import torch

from training.clip.shards import CacheError, shard_file
from training.clip.similarities import compute_prompt_embeddings
from training.clip.source import ClipSimilarity, EmbeddingCache
from training.data.folder import ImageFolderSplit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SALFCTL = [sys.executable, "-c", "from clients.salfctl import main; main()"]
PLACEMENT = "cells"  # tiny-clip-cpu's grid_placement: what `train similarities` builds the reference cache with


def _stage_args(data: Path, out: Path, shard_size: int = 1) -> list[str]:
    return [*SALFCTL, "train", "similarities", "--data", str(data), "--out", str(out), "--config", "tiny-clip-cpu",
            "--shard-size", str(shard_size), "--batch-size", "98", "--device", "cpu"]


def _tree_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file (temporary files included: a clean cache has none)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _names(data: Path) -> tuple[list[Path], list[str]]:
    ds = ImageFolderSplit(data, "train")
    return ds.paths, [p.relative_to(ds.root).as_posix() for p in ds.paths]


@pytest.fixture(scope="module")
def reference_cache(clip_small_data, tmp_path_factory) -> Path:
    """An uninterrupted run of `salfctl train similarities` (16 images, 16 one-image shards: many shards so
    that a kill lands mid-run even on a fast machine)."""
    out = tmp_path_factory.mktemp("ref") / "sim"
    res = subprocess.run(_stage_args(clip_small_data, out), capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stderr
    return out


def test_killed_run_resumes_to_a_byte_identical_cache(clip_small_data, reference_cache, tmp_path):
    out = tmp_path / "sim"
    proc = subprocess.Popen(_stage_args(clip_small_data, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_after(proc, out, "shard-*.json", 2)  # two shards complete (records are written after their shard)
    done_before = len(list(out.glob("shard-*.json")))
    assert 2 <= done_before < 16, "the kill must land mid-run"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False
    with pytest.raises(CacheError, match="incomplete"):
        EmbeddingCache(out)

    res = subprocess.run([*_stage_args(clip_small_data, out), "-v"], capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stderr
    assert f"{done_before} already complete" in res.stderr
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the killed run's temporaries are gone
    assert _tree_digest(out) == _tree_digest(reference_cache)


def test_truncated_shard_is_detected_and_recomputed(clip_small_data, reference_cache, tiny_clip, tmp_path):
    import shutil

    out = tmp_path / "sim"
    shutil.copytree(reference_cache, out)
    victim = out / shard_file(3)
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CacheError, match="truncated or corrupted"):
        EmbeddingCache(out).gather([3])
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    paths, names = _names(clip_small_data)
    compute_prompt_embeddings(paths, names, tiny_clip, out, (7, 7), 16, shard_size=1, batch_size=98, placement=PLACEMENT)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    assert [n for n in before if before[n] != after[n]] == [shard_file(3)]  # only the bad shard was redone
    assert _tree_digest(out) == _tree_digest(reference_cache)


def test_changed_settings_are_refused_without_overwrite(clip_small_data, reference_cache, tiny_clip, tmp_path):
    import shutil

    out = tmp_path / "sim"
    shutil.copytree(reference_cache, out)
    paths, names = _names(clip_small_data)
    with pytest.raises(CacheError, match="radius"):
        compute_prompt_embeddings(paths, names, tiny_clip, out, (7, 7), 12, shard_size=1, batch_size=98, placement=PLACEMENT)
    # Other shard/batch sizes only: the cache keeps its own and is reused untouched.
    compute_prompt_embeddings(paths, names, tiny_clip, out, (7, 7), 16, shard_size=5, batch_size=49, placement=PLACEMENT)
    assert _tree_digest(out) == _tree_digest(reference_cache)
    # A damaged manifest is refused with its path; --overwrite rebuilds with the new settings.
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="unreadable manifest"):
        compute_prompt_embeddings(paths, names, tiny_clip, out, (7, 7), 16, shard_size=1, batch_size=98, placement=PLACEMENT)
    compute_prompt_embeddings(paths, names, tiny_clip, out, (7, 7), 12, shard_size=8, batch_size=98, overwrite=True,
                              placement=PLACEMENT)
    cache = EmbeddingCache(out)
    assert cache.spec.radius == 12 and len(cache.shards) == 2 and not (out / shard_file(2)).exists()


def test_an_image_replaced_under_the_same_name_is_not_served_from_the_old_cache(clip_small_data, reference_cache,
                                                                               tiny_clip, tmp_path):
    """Names alone pinned the cache: a regenerated dataset with the same file names resumed (or reused)
    the stale embeddings. The digest covers file sizes too, so such a cache is refused."""
    import shutil

    data, out = tmp_path / "data", tmp_path / "sim"
    shutil.copytree(clip_small_data, data)
    shutil.copytree(reference_cache, out)
    paths, names = _names(data)
    big = next(p for p in paths if p.stat().st_size != paths[0].stat().st_size)
    shutil.copyfile(big, paths[0])  # another image under image 0's name
    with pytest.raises(CacheError, match="images_sha256"):
        compute_prompt_embeddings(paths, names, tiny_clip, out, (7, 7), 16, shard_size=1, batch_size=98, placement=PLACEMENT)


def test_two_ranks_write_the_same_cache_as_one_process(clip_small_data, reference_cache, tmp_path):
    """The real launcher (torchrun, 2 processes, gloo): each rank encodes its own shards; the cache is
    byte-identical to the single-process one (torchrun also sets OMP_NUM_THREADS=1 per rank)."""
    out = tmp_path / "sim"
    salfctl = Path(sys.executable).parent / "salfctl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(salfctl), *_stage_args(clip_small_data, out)[3:], "-v"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 0/2, 8 shards of mine" in res.stderr and "rank 1/2, 8 shards of mine" in res.stderr
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    assert _tree_digest(out) == _tree_digest(reference_cache)


def test_clip_similarity_forms_cosines_per_batch(reference_cache, tiny_clip, clip_small_data):
    from training.clip.bench import naive_prompt_embeddings

    concepts = ["circle", "red", "stripes"]
    text = tiny_clip.encode_text(concepts)
    source = ClipSimilarity(EmbeddingCache(reference_cache), concepts, text)
    p = source.similarities([5, 0, 5])
    assert p.shape == (3, 3, 7, 7) and p.dtype == torch.float32
    assert source.grid == (7, 7) and source.concepts == concepts and len(source) == 16
    paths, _ = _names(clip_small_data)
    naive = naive_prompt_embeddings([paths[5], paths[0]], tiny_clip, (7, 7), 16, PLACEMENT)  # [2, 49, D]
    expected = torch.einsum("bgd,md->bmg", naive, text).reshape(2, 3, 7, 7)
    torch.testing.assert_close(p[:2], expected, atol=1e-3, rtol=0)  # fp16 cache
    assert torch.equal(p[0], p[2])
    # Memory-mapped reading gives the same P as the preloaded cache.
    mm = ClipSimilarity(EmbeddingCache(reference_cache, preload=False), concepts, text)
    assert torch.equal(mm.similarities([5, 0, 5]), p)
    with pytest.raises(IndexError):
        source.similarities([16])
    sub = source.subset([2, 0])
    assert sub.concepts == ["stripes", "circle"]
    torch.testing.assert_close(sub.similarities([5])[0, 1], p[0, 0], atol=1e-6, rtol=0)
