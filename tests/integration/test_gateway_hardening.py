"""The gateway under misbehaving clients: idle streams, overload, deadlines inside its own loops,
malformed messages, oversized input, a second gateway on the same port, SIGTERM under load."""
from __future__ import annotations

import socket
import statistics
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.gateway import encode, sample_image, start_gateway, start_salfctl_serve

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _stubs(url):
    from grpc_health.v1 import health_pb2_grpc

    from salf.v1 import gateway_pb2, gateway_pb2_grpc

    channel = grpc.insecure_channel(url)
    return channel, gateway_pb2, gateway_pb2_grpc.GatewayStub(channel), health_pb2_grpc.HealthStub(channel)


def _health_latency(health, n: int) -> list[float]:
    from grpc_health.v1 import health_pb2

    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        out.append(time.perf_counter() - t)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        time.sleep(0.01)
    return out


class IdleStreams:
    """``n`` HTTP/2 streams to Predict that send their headers and nothing else (raw h2 client)."""

    def __init__(self, port: int, n: int, per_connection: int = 16) -> None:
        import h2.config
        import h2.connection

        self.conns = []
        for start in range(0, n, per_connection):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.settimeout(0.2)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()
            streams = {}
            for _ in range(min(per_connection, n - start)):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", "/salf.v1.Gateway/Predict"),
                                        (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
                                        ("te", "trailers")], end_stream=False)
                streams[sid] = None
            sock.sendall(conn.data_to_send())
            self.conns.append((sock, conn, streams))

    def poll(self) -> dict[str, int]:
        """Read what arrived; returns counts of streams by state ("open", or the grpc-status they ended with)."""
        import h2.events

        for sock, conn, streams in self.conns:
            try:
                data = sock.recv(1 << 16)
            except (socket.timeout, BlockingIOError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                for sid in streams:
                    streams[sid] = streams[sid] or "closed"
                continue
            if data:
                for event in conn.receive_data(data):
                    if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                        status = dict(event.headers).get("grpc-status")
                        if status is not None:
                            streams[event.stream_id] = f"grpc-status {status}"
                    elif isinstance(event, h2.events.StreamReset):
                        # the server sends its status, then resets the stream the client never half-closed
                        streams[event.stream_id] = streams[event.stream_id] or "reset"
                try:
                    sock.sendall(conn.data_to_send())
                except OSError:
                    pass
        counts: dict[str, int] = {}
        for _, _, streams in self.conns:
            for state in streams.values():
                counts[state or "open"] = counts.get(state or "open", 0) + 1
        return counts

    def close(self) -> None:
        for sock, _, _ in self.conns:
            sock.close()


BUSY_CLIENTS = """
import sys, threading, time, grpc
from salf.v1 import gateway_pb2 as pb, gateway_pb2_grpc
from tests.fixtures.gateway import encode, sample_image
url, seconds = sys.argv[1], float(sys.argv[2])
image, done, errors, end = encode(sample_image(1)), [0], [], time.monotonic() + seconds
def busy():
    with grpc.insecure_channel(url) as ch:
        s = gateway_pb2_grpc.GatewayStub(ch)
        while time.monotonic() < end:
            try:
                s.Predict(pb.PredictRequest(image=image), timeout=30)
                done[0] += 1
            except grpc.RpcError as exc:
                errors.append(exc.code().name)
ts = [threading.Thread(target=busy) for _ in range(32)]
[t.start() for t in ts]
[t.join() for t in ts]
print(done[0], len(errors), sorted(set(errors)))
"""


def test_idle_streams_and_busy_clients_do_not_stop_health_or_predict(exported_repo, tmp_path):
    """The gateway runs as `salfctl serve` and the 32 busy clients in a process of their own, so the health
    latency measured here is the gateway's, not this process's threads competing for one GIL."""
    import subprocess
    import sys

    from tests.fixtures.gateway import ROOT

    serve = start_salfctl_serve(exported_repo, tmp_path / "serve.log",
                                extra=["--stream-idle", "2", "--max-in-flight", "48"])
    channel, pb, stub, health = _stubs(serve.url)
    image = encode(sample_image(1))
    load = subprocess.Popen([sys.executable, "-c", BUSY_CLIENTS, serve.url, "8"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = int(serve.url.rsplit(":", 1)[1])
    idle = IdleStreams(port, 64)
    try:
        time.sleep(1.0)
        assert idle.poll().get("open") == 64  # the 64 streams are really open and waiting
        latency = _health_latency(health, 60)
        p99 = float(np.quantile(latency, 0.99))
        assert p99 < 0.1, f"health p99 {p99 * 1000:.1f} ms with 64 idle streams and 32 busy clients"
        r = stub.Predict(pb.PredictRequest(image=image), timeout=10)
        assert len(r.classes) == 3
        # the idle streams are dropped after --stream-idle (2 s) with DEADLINE_EXCEEDED (4)
        end = time.monotonic() + 10
        counts = idle.poll()
        while counts.get("open", 0) and time.monotonic() < end:
            counts = idle.poll()
        assert counts == {"grpc-status 4": 64}, counts
        out, err = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
        idle.close()
        channel.close()
        serve.stop(grace=10.0)
    done, n_errors = (int(v) for v in out.split()[:2])
    assert n_errors == 0 and done > 32, (out, err[-2000:])
    print(f"health p50 {statistics.median(latency) * 1000:.2f} ms p99 {p99 * 1000:.2f} ms; "
          f"{done} Predicts by 32 busy clients meanwhile")


def _slow_backend(gw, seconds: float):
    """Make every backend call of ``gw`` take ``seconds`` longer (the real call still runs)."""
    backend = gw.server.backend
    original = backend._run

    def slow(model, feeds, outputs, timeout_s):
        time.sleep(seconds)
        return original(model, feeds, outputs, timeout_s)

    backend._run = slow


def test_in_flight_limit_sheds_load_and_health_still_answers(exported_repo):
    gw = start_gateway(exported_repo, max_in_flight=2, metrics_port=None)
    _slow_backend(gw, 1.0)
    channel, pb, stub, health = _stubs(gw.url)
    image = encode(sample_image(2))
    try:
        calls = [stub.Predict.future(pb.PredictRequest(image=image), timeout=10) for _ in range(2)]
        time.sleep(0.3)
        t = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(pb.PredictRequest(image=image), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 2 requests in flight" in info.value.details() and time.perf_counter() - t < 0.5
        assert max(_health_latency(health, 10)) < 0.1
        assert all(len(c.result().classes) == 3 for c in calls)  # the admitted ones finish
        assert len(stub.Predict(pb.PredictRequest(image=image), timeout=10).classes) == 3
    finally:
        channel.close()
        gw.server.stop(grace=1.0)


def test_deadline_stops_the_gateways_own_loop(exported_repo):
    """1000 edits of a full-image mask on a 12 MP image: each edit projects 12 M pixels; with a 0.5 s
    deadline the call ends DEADLINE_EXCEEDED within a fraction of a second of it (was 47 s past it)."""
    from serving.service import Limits

    gw = start_gateway(exported_repo, limits=Limits(max_edits=1000), metrics_port=None)
    channel, pb, stub, _ = _stubs(gw.url)
    h, w = 3000, 4000
    image = encode(np.asarray(Image.fromarray(sample_image(3)).resize((w, h))))
    mask = encode(np.full((h, w), 255, np.uint8))
    try:
        first = stub.Explain(pb.ExplainRequest(image=image, heatmaps=pb.HEATMAP_FORMAT_NONE), timeout=60)
        edit = pb.ConceptEdit(concept_index=0, beta=1.0, region=pb.Region(mask_png=mask))
        request = pb.InterveneRequest(explanation_id=first.explanation_id, edits=[edit] * 1000)
        t = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            stub.Intervene(request, timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(1.0)
        # the gateway stopped working on it: a new call is served at once, and its metrics say why
        t = time.perf_counter()
        stub.GetClassRules(pb.GetClassRulesRequest(), timeout=5)
        assert time.perf_counter() - t < 0.5
        assert gw.server._executor._work_queue.qsize() == 0
    finally:
        channel.close()
        gw.server.stop(grace=1.0)


def test_malformed_messages_and_huge_names_are_invalid_argument(embedded_gateway):
    channel, pb, stub, _ = _stubs(embedded_gateway.url)
    try:
        raw = channel.unary_unary("/salf.v1.Gateway/Predict", request_serializer=None, response_deserializer=None)
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05ab", b"\x10\xff"):
            with pytest.raises(grpc.RpcError) as info:
                raw(garbage, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert "not a valid salf.v1.PredictRequest" in info.value.details()
        name = "x" * 1_000_000
        with pytest.raises(grpc.RpcError) as info:
            stub.Explain(pb.ExplainRequest(image=encode(sample_image(4)), class_name=name), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown class" in info.value.details() and len(info.value.details()) < 1000
        points = pb.Points(points=[pb.Point(x=1, y=1)] * 200_000, radius=1)
        t = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            stub.ExplainRegion(pb.ExplainRegionRequest(image=encode(sample_image(4)), region=pb.Region(points=points)),
                               timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "200000 points" in info.value.details()
        assert time.perf_counter() - t < 2.0
        assert len(stub.Predict(pb.PredictRequest(image=encode(sample_image(4))), timeout=10).classes) == 3
    finally:
        channel.close()


def test_oversized_images_are_refused_from_their_header(embedded_gateway):
    channel, pb, stub, _ = _stubs(embedded_gateway.url)
    big = encode(np.zeros((7999, 7999), np.uint8))  # 64 MP of zeros compresses to ~60 KB
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(pb.PredictRequest(image=big), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "7999x7999 pixels; at most 40000000" in info.value.details()
        # a mask of another size is refused before its pixels are decoded
        mask = encode(np.zeros((7000, 5000), np.uint8))
        with pytest.raises(grpc.RpcError) as info:
            stub.ExplainRegion(pb.ExplainRegionRequest(image=encode(sample_image(5)), region=pb.Region(mask_png=mask)),
                               timeout=10)
        assert "mask is 5000x7000" in info.value.details()
    finally:
        channel.close()


def test_a_second_gateway_on_the_same_port_fails(exported_repo):
    from serving.server import GatewayServer, ServeConfig

    first = start_gateway(exported_repo, metrics_port=None)
    try:
        with pytest.raises(OSError, match=f"cannot bind the gateway to 127.0.0.1:{first.server.port}"):
            GatewayServer(ServeConfig(model_repository=exported_repo, host="127.0.0.1", port=first.server.port,
                                      metrics_port=None)).start()
    finally:
        first.server.stop(grace=0.5)


def test_sigterm_under_load_finishes_calls_in_flight(exported_repo, tmp_path):
    serve = start_salfctl_serve(exported_repo, tmp_path / "serve.log", extra=["--grace", "10"])
    image = encode(sample_image(6))
    stop, outcomes = threading.Event(), []

    def client():
        ch, pb, s, _ = _stubs(serve.url)
        while not stop.is_set():
            try:
                s.Predict(pb.PredictRequest(image=image), timeout=20)
                outcomes.append("OK")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)
                time.sleep(0.05)
        ch.close()

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    code = serve.stop(grace=30.0)
    stop.set()
    for t in threads:
        t.join()
    log = serve.log_path.read_text()
    assert code == 0, log
    assert "Traceback" not in log and "KeyError" not in log, log
    assert "gateway stopped" in log
    assert outcomes.count("OK") > 8
    # No call the gateway had started on was cut: its boundary logs every cancellation it sees.
    assert "-> CANCELLED" not in log and "-> UNKNOWN" not in log and "-> INTERNAL" not in log, log[-3000:]
    # After SIGTERM new calls are refused: UNAVAILABLE from the draining gateway, or, for a call that
    # reaches the transport as it closes and is never started, CANCELLED (RST_STREAM) from gRPC itself.
    assert set(outcomes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, sorted(set(outcomes))
    assert outcomes.count("CANCELLED") <= len(threads)


def test_sixteen_bit_and_exif_rotated_images_get_the_right_prediction(embedded_gateway):
    """The gateway sees the pixels a person sees: a 16-bit PNG predicts like its 8-bit version, and a
    JPEG stored sideways with an EXIF orientation predicts like the upright picture."""
    import io

    channel, pb, stub, _ = _stubs(embedded_gateway.url)
    rgb = sample_image(10)
    logits = lambda data: np.array([c.logit for c in sorted(
        stub.Predict(pb.PredictRequest(image=data, top_k=3), timeout=10).classes, key=lambda c: c.index)])
    try:
        grey16 = rgb[..., 0].astype(np.uint16) * 257 + 3  # high byte = the 8-bit value
        np.testing.assert_array_equal(logits(encode(grey16)), logits(encode(rgb[..., 0])))
        stored = Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        stored.save(buf, format="JPEG", quality=95, exif=exif)
        tagged = buf.getvalue()
        upright = np.asarray(Image.open(io.BytesIO(tagged)).convert("RGB").transpose(Image.Transpose.ROTATE_270))
        np.testing.assert_array_equal(logits(tagged), logits(encode(upright)))
        r = stub.Predict(pb.PredictRequest(image=tagged), timeout=10)
        assert (r.image_height, r.image_width) == rgb.shape[:2]
    finally:
        channel.close()


def test_a_cancelled_call_stops_its_work(exported_repo):
    """A client that cancels a long Intervene (no deadline) frees the gateway's worker within a step:
    with one worker, a task queued right after the cancellation runs at once."""
    from serving.service import Limits

    gw = start_gateway(exported_repo, limits=Limits(max_edits=1000), max_in_flight=1, metrics_port=None)
    channel, pb, stub, _ = _stubs(gw.url)
    h, w = 3000, 4000
    image = encode(np.asarray(Image.fromarray(sample_image(11)).resize((w, h))))
    mask = encode(np.full((h, w), 255, np.uint8))
    try:
        first = stub.Explain(pb.ExplainRequest(image=image, heatmaps=pb.HEATMAP_FORMAT_NONE), timeout=60)
        edit = pb.ConceptEdit(concept_index=0, beta=1.0, region=pb.Region(mask_png=mask))
        call = stub.Intervene.future(pb.InterveneRequest(explanation_id=first.explanation_id, edits=[edit] * 1000))
        time.sleep(1.0)
        assert call.cancel()
        time.sleep(0.3)
        t = time.perf_counter()
        gw.server._executor.submit(lambda: None).result(timeout=30)
        waited = time.perf_counter() - t
        assert waited < 1.0, f"the cancelled call kept the only worker busy for {waited:.1f} s more"
        cancelled = gw.server.metrics.requests.labels("Intervene", "CANCELLED")._value.get()
        assert cancelled == 1
    finally:
        channel.close()
        gw.server.stop(grace=1.0)
