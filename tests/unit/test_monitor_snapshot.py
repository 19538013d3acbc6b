"""salfctl monitor's snapshot (clients/monitor.py) on recorded metrics text: rates, quantiles, batch size."""
import pytest

from clients.monitor import Scrape, parse, render, snapshot

GATEWAY_0 = """
# TYPE salf_gateway_requests_total counter
salf_gateway_requests_total{code="OK",method="Predict"} 100.0
salf_gateway_requests_total{code="INVALID_ARGUMENT",method="Predict"} 2.0
# TYPE salf_gateway_request_seconds histogram
salf_gateway_request_seconds_bucket{code="OK",le="0.01",method="Predict"} 50.0
salf_gateway_request_seconds_bucket{code="OK",le="0.1",method="Predict"} 100.0
salf_gateway_request_seconds_bucket{code="OK",le="+Inf",method="Predict"} 100.0
salf_gateway_request_seconds_count{code="OK",method="Predict"} 100.0
salf_gateway_request_seconds_sum{code="OK",method="Predict"} 2.0
# TYPE salf_gateway_in_flight_requests gauge
salf_gateway_in_flight_requests{method="Predict"} 3.0
# TYPE salf_gateway_cache_hits counter
salf_gateway_cache_hits_total 10.0
# TYPE salf_gateway_cache_misses counter
salf_gateway_cache_misses_total 10.0
# TYPE salf_gateway_model info
salf_gateway_model_info{backend="triton",version="2"} 1.0
"""
GATEWAY_1 = (GATEWAY_0.replace('method="Predict"} 100.0\nsalf_gateway_requests_total{code="INVALID',
                               'method="Predict"} 300.0\nsalf_gateway_requests_total{code="INVALID')
             .replace('code="INVALID_ARGUMENT",method="Predict"} 2.0', 'code="INVALID_ARGUMENT",method="Predict"} 6.0')
             .replace('le="0.01",method="Predict"} 50.0', 'le="0.01",method="Predict"} 50.0')
             .replace('le="0.1",method="Predict"} 100.0', 'le="0.1",method="Predict"} 300.0')
             .replace('le="+Inf",method="Predict"} 100.0', 'le="+Inf",method="Predict"} 300.0')
             .replace("salf_gateway_cache_hits_total 10.0", "salf_gateway_cache_hits_total 40.0"))
TRITON_0 = """
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="salf_cbm",version="1"} 10
# TYPE nv_inference_count counter
nv_inference_count{model="salf_cbm",version="1"} 10
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="salf_cbm",version="1"} 10
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="salf_cbm",version="1"} 1000
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{model="salf_cbm",version="1"} 5000
"""
TRITON_1 = TRITON_0.replace("} 10\n", "} 90\n").replace('exec_count{model="salf_cbm",version="1"} 90',
                                                         'exec_count{model="salf_cbm",version="1"} 30') \
    .replace("} 1000", "} 17000").replace("} 5000", "} 85000")


def _pair(a, b, url):
    return parse(a, url, at=10.0), parse(b, url, at=12.0)


def test_rates_quantiles_errors_and_cache_from_two_scrapes():
    doc = snapshot(_pair(GATEWAY_0, GATEWAY_1, "g"), None)
    g = doc["gateway"]
    assert g["up"] and doc["gateway"]["interval_s"] == 2.0
    p = g["rpcs"]["Predict"]
    assert p["requests_per_s"] == pytest.approx((300 + 6 - 102) / 2)
    # 200 new requests, all in the (0.01, 0.1] bucket: p50 at its middle, p99 near its top (linear)
    assert p["p50_ms"] == pytest.approx(55.0) and p["p99_ms"] == pytest.approx(99.1)
    assert p["in_flight"] == 3 and g["errors"] == {"INVALID_ARGUMENT": 4.0}
    assert g["cache_hit_rate"] == pytest.approx(30 / 30)
    assert g["model"]["version"] == "2"


def test_triton_average_batch_size_and_times():
    doc = snapshot(None, _pair(TRITON_0, TRITON_1, "t"))
    m = doc["triton"]["models"]["salf_cbm"]
    assert m["avg_batch_size"] == pytest.approx(80 / 20)  # 80 inferences in 20 executions
    assert m["requests_per_s"] == pytest.approx(40.0)
    assert m["queue_ms"] == pytest.approx(16000 / 80 / 1000) and m["compute_ms"] == pytest.approx(80000 / 80 / 1000)


def test_a_down_endpoint_is_reported_and_rendered():
    down = Scrape("http://127.0.0.1:1/metrics", 1.0, error="URLError: connection refused")
    doc = snapshot((None, down), _pair(TRITON_0, TRITON_1, "t"))
    assert doc["gateway"] == {"url": down.url, "up": False, "error": down.error, "interval_s": None}
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(render(doc))
    text = console.export_text()
    assert "DOWN" in text and "salf_cbm" in text and "4.00" in text
