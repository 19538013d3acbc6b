"""Memory that does not grow with the dataset (issue 22): the CBL and head stages' peak resident set at N and
4N training images stays within 10%, N = 4000 (tests/bench/scale_probe.py: 32 px noise images through a tiny
random CNN into a real feature cache, M = 2000 concepts, the head's activations in a memory-mappable fp16
file streamed in blocks; peak = VmHWM of each stage's own process, glibc's mmap threshold fixed at 4 MB as in
`make bench-scale`, tests/bench/scale.py FIXED_HEAP says why). The control, the head with its activations
gathered in RAM as before, grows by more than 10% at the same sizes: the measurement can see what it
guards against."""
from __future__ import annotations

import pytest

from tests.bench.scale import probe

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

N = 4000


def test_cbl_and_head_peak_rss_stay_flat_from_n_to_4n(tmp_path):
    peaks = {}
    for n in (N, 4 * N):
        work = tmp_path / str(n)
        probe("features", work, n, 2000, 1, 10)
        peaks[n] = {"cbl": probe("cbl", work, n, 2000, 1, 10)["peak_rss_mb"],
                    "head": probe("head", work, n, 2000, 1, 10)["peak_rss_mb"],
                    "control": probe("head", work, n, 2000, 1, 10, in_memory=True)["peak_rss_mb"]}
    small, big = peaks[N], peaks[4 * N]
    for stage in ("cbl", "head"):
        assert big[stage] <= 1.10 * small[stage], f"{stage}: {small[stage]:.0f} MB at N, {big[stage]:.0f} MB at 4N"
    assert big["control"] > 1.10 * small["control"], f"the control did not grow: {peaks}"
