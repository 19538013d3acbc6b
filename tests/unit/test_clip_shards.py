"""training/clip/shards.py: shard ranges and names, the image-list digest, the completeness check."""
import pytest
import torch

from training.clip.shards import images_digest, record_file, shard_complete, shard_file, shard_ranges, write_shard


def test_shard_ranges_cover_every_image_once():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(4, 4) == [(0, 4)]
    with pytest.raises(ValueError, match="shard_size"):
        shard_ranges(4, 0)


def test_images_digest_pins_order_and_sizes(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"12")
    b.write_bytes(b"345")
    assert images_digest(["a", "b"]) != images_digest(["b", "a"])
    with_sizes = images_digest(["a", "b"], [a, b])
    assert with_sizes != images_digest(["a", "b"])
    b.write_bytes(b"3456")  # regenerated under the same name: another cache
    assert images_digest(["a", "b"], [a, b]) != with_sizes
    with pytest.raises(ValueError, match="paths but"):
        images_digest(["a"], [a, b])


def test_a_written_shard_is_complete_until_damaged(tmp_path):
    assert shard_file(3) == "shard-00003.safetensors" and record_file(3) == "shard-00003.json"
    emb = torch.arange(24, dtype=torch.float16).reshape(2, 3, 4)
    write_shard(tmp_path, 0, 0, 2, emb)
    assert shard_complete(tmp_path, 0, 0, 2)["bytes"] == (tmp_path / shard_file(0)).stat().st_size
    assert shard_complete(tmp_path, 0, 0, 3) is None  # the record covers other images
    data = (tmp_path / shard_file(0)).read_bytes()
    (tmp_path / shard_file(0)).write_bytes(data[:-1])  # truncated by a kill
    assert shard_complete(tmp_path, 0, 0, 2) is None
