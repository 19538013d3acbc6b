"""training/distributed.py: the launcher's environment (torchrun's RANK/WORLD_SIZE) read once."""
import pytest

from training.distributed import barrier, distributed_context


def test_no_launcher_is_rank_zero_of_one(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed_context() == (0, 1, False)
    barrier(1)  # one rank: nothing to wait for, no process group needed


@pytest.mark.parametrize("rank,world", [("2", "2"), ("-1", "2"), ("0", "0")])
def test_bad_environment_is_named(monkeypatch, rank, world):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(ValueError, match="bad RANK/WORLD_SIZE"):
        distributed_context()
