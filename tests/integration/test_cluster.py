"""Three gateways behind Envoy (deploy/envoy.yaml, started by deploy/cluster.py as `make cluster` does) on
one real Triton, no shared store (issue 23): affinity routing keeps an explanation's follow-ups on the
gateway that holds its maps, and a gateway killed under load costs no failed call.

Envoy's ring_hash sends each x-salf-affinity key to one gateway; the client sends the image's digest on
Explain and the same key on every follow-up (clients/client.py)."""
from __future__ import annotations

import signal
import time

import pytest

from clients.client import SalfClient
from deploy.cluster import Cluster
from tests.cluster import Load, summed, triton_forwards
from tests.fixtures.gateway import encode, sample_image

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster(exported_repo, triton_server, tmp_path_factory):
    c = Cluster(exported_repo, tmp_path_factory.mktemp("cluster"), gateways=3, prometheus=False,
                triton=triton_server).start()
    yield c
    c.stop()


def test_one_explain_and_twenty_follow_ups_cost_one_forward(cluster):
    image = encode(sample_image(101))
    forwards, hits = triton_forwards(cluster.triton), summed(cluster, "salf_gateway_cache_hits_total")
    with SalfClient.connect(cluster.url, timeout=20) as c:
        e = c.explain(image, top_k=3, heatmaps="none")
        region = c.region(box=(0, 0, 30, 30))
        edit = c.edit(region, 1.5, 0)
        for k in range(20):
            r = (c.explain_region(region, explanation_id=e.explanation_id) if k % 2 == 0
                 else c.intervene([edit], explanation_id=e.explanation_id))
            assert r.explanation_id == e.explanation_id
    assert triton_forwards(cluster.triton) - forwards == 1
    assert summed(cluster, "salf_gateway_cache_hits_total") - hits == 20


def test_a_gateway_killed_under_load_fails_no_call_and_its_explanations_are_recomputed_once(cluster):
    """16 clients, each with its own explanation, send follow-ups through Envoy; one gateway is SIGKILLed.
    Every call succeeds (Envoy retries, then the client resends the image after NOT_FOUND) and keeps its id;
    each explanation the dead gateway held is recomputed exactly once, on the gateway its key moved to.
    (Envoy rebuilds its ring for two gateways, which may also move a key of a surviving gateway: such a
    key is recomputed once too, and the test reports how many moved.)"""
    import grpc

    images = [encode(sample_image(200 + k)) for k in range(16)]
    clients = [SalfClient.connect(cluster.url, timeout=20) for _ in images]
    try:
        ids, owner = [], []
        for c, img in zip(clients, images):
            ids.append(c.explain(img, top_k=1, heatmaps="none").explanation_id)
            owner.append(c.last_replica)
        assert set(owner) <= {g.name for g in cluster.replicas}, owner
        victim = max(cluster.replicas, key=lambda g: owner.count(g.name))
        region = clients[0].region(box=(10, 10, 40, 40))
        edit = clients[0].edit(region, 1.0, 0)
        seen: dict[int, set] = {k: set() for k in range(16)}
        resent = [0] * 16

        def follow_up(k: int, n: int) -> None:
            c = clients[k]
            call = ((lambda i, img: c.explain_region(region, explanation_id=i, image=img)) if n % 2 == 0
                    else (lambda i, img: c.intervene([edit], explanation_id=i, image=img)))
            try:
                r = call(ids[k], b"")
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                resent[k] += 1  # the client's resend (clients.client.by_explanation_id): one forward
                r = call(ids[k], images[k])
            seen[k].add(r.explanation_id)

        load = Load(16, follow_up, seconds=12).start()
        time.sleep(2.0)
        forwards = triton_forwards(cluster.triton)
        victim.signal(signal.SIGKILL)
        time.sleep(6.0)
        load.stop()
        recomputed = triton_forwards(cluster.triton) - forwards
    finally:
        for c in clients:
            c.close()
    held = [k for k in range(16) if owner[k] == victim.name]
    moved = [k for k in range(16) if owner[k] != victim.name and resent[k]]
    print(f"{len(held)} explanations on the killed gateway, {len(moved)} of the survivors' moved by the ring rebuild; "
          f"{load.calls} calls; Envoy: {cluster.envoy_stats(('retry', 'ejections_enforced_total'))}")
    assert load.failures == [], load.failures[:5]
    assert load.calls > 16 * 10
    assert all(seen[k] == {ids[k]} for k in range(16)), "every follow-up keeps its explanation's id"
    assert held and all(resent[k] == 1 for k in held), [resent[k] for k in held]
    assert all(resent[k] <= 1 for k in range(16)), resent
    assert recomputed == sum(resent), (recomputed, resent, cluster.envoy_stats())
    cluster.restart_gateway(cluster.replicas.index(victim))
    end = time.monotonic() + 30
    while cluster.healthy_upstreams() != 3:
        assert time.monotonic() < end, "Envoy did not take the restarted gateway back"
        time.sleep(0.2)
