"""clients/client.py: the affinity key a balancer hashes on, and the retrying service config."""
import json

from clients.client import RETRY_SERVICE_CONFIG, SalfClient, affinity_key


def test_follow_ups_carry_the_key_their_explain_was_sent_with():
    c = SalfClient("127.0.0.1:1")  # no connection is made before a call
    try:
        image = b"\x89PNG some bytes"
        assert affinity_key(image) == affinity_key(bytes(image)) != affinity_key(image + b"!")
        assert c.affinity_for("", image) == affinity_key(image)
        assert c.affinity_for("id-1", b"") == "id-1"  # an id this client did not make: keyed by the id
        c._remember("id-1", affinity_key(image))
        assert c.affinity_for("id-1", b"") == c.affinity_for("id-1", b"other") == affinity_key(image)
        for k in range(c.AFFINITY_MEMORY + 1):
            c._remember(f"x{k}", "k")
        assert c.affinity_for("id-1", b"") == "id-1"  # bounded: the oldest went
    finally:
        c.close()


def test_the_service_config_retries_unavailable_only():
    (method,) = RETRY_SERVICE_CONFIG["methodConfig"]
    assert method["name"] == [{"service": "salf.v1.Gateway"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    json.dumps(RETRY_SERVICE_CONFIG)  # what the channel option carries
