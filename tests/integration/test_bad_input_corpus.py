"""A corpus of bad (and some good) requests over every RPC, generated with hypothesis.

Every request must end with a status a client can act on (OK, INVALID_ARGUMENT, NOT_FOUND; never
UNKNOWN or INTERNAL) and, when it fails, a message that names the problem in less than 1000 characters;
a normal request must succeed after each one, and the process's memory must stay bounded. The table of
status codes per RPC is printed (and written to ``$SALF_CORPUS_REPORT`` when set).
"""
from __future__ import annotations

import collections
import json
import os
import struct
import zlib

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from tests.fixtures.gateway import encode, sample_image, save_image as _save

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}
TABLE: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
SETTINGS = settings(max_examples=70, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` (valid header and CRC) and carries almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _images() -> dict[str, bytes]:
    rgb = sample_image(7)
    png, jpeg = encode(rgb), encode(rgb, "JPEG")
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "png": png, "jpeg": jpeg,
        "zero-byte": b"", "truncated-png": png[: len(png) // 2], "truncated-jpeg": jpeg[: len(jpeg) // 3],
        "huge-declared": _png_header(100_000, 100_000), "huge-declared-2": _png_header(7000, 7000),
        "cmyk": _save(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "16-bit": _save(Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)), "PNG"),
        "palette": _save(Image.fromarray(rgb).quantize(16), "PNG"),
        "grey": encode(rgb[..., 1]), "alpha": _save(Image.fromarray(np.dstack([rgb, rgb[..., 0]]), "RGBA"), "PNG"),
        "animated": _save(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "gif": _save(frames[0], "GIF"), "bmp": _save(frames[0], "BMP"), "tiff": _save(frames[0], "TIFF"),
        "exif-rotated": _save(Image.fromarray(rgb), "JPEG", exif=exif),
        "text": b"hello, this is not an image", "random": np.random.default_rng(0).bytes(4096),
    }


def _masks(size=(84, 112)) -> dict[str, bytes]:
    h, w = size
    m = np.zeros((h, w), np.uint8)
    m[10:40, 20:60] = 255
    clear = np.zeros((h, w, 4), np.uint8)
    clear[..., :3] = 255  # a white layer, fully transparent: selects nothing
    return {"ok": encode(m), "wrong-size": encode(m[:50]), "empty": encode(np.zeros((h, w), np.uint8)),
            "transparent-layer": _save(Image.fromarray(clear, "RGBA"), "PNG"), "not-an-image": b"\x00\x01garbage",
            "16-bit": _save(Image.fromarray(m.astype(np.uint16) * 257), "PNG"), "zero-byte": b""}


IMAGES = _images()
MASKS = _masks()
floats = st.one_of(st.floats(-1e4, 1e4, allow_nan=False), st.sampled_from([float("nan"), float("inf"), -float("inf"),
                                                                           1e38, -1e38, 0.0, 3e38]))
names = st.one_of(st.text(max_size=40), st.sampled_from(["concept 1", "class_2", "", "x" * 100_000, "\x00\udfff"[:1]]))
indices = st.one_of(st.integers(-10, 10), st.sampled_from([2**31 - 1, -(2**31)]))
top_ks = st.one_of(st.integers(-3, 8), st.sampled_from([2**31 - 1, -(2**31)]))


@pytest.fixture(scope="module")
def conn(embedded_gateway):
    from salf.v1 import gateway_pb2, gateway_pb2_grpc

    channel = grpc.insecure_channel(embedded_gateway.url)
    yield gateway_pb2, gateway_pb2_grpc.GatewayStub(channel), channel
    channel.close()
    report = {rpc: dict(codes) for rpc, codes in sorted(TABLE.items())}
    total = sum(sum(c.values()) for c in report.values())
    print(f"\nbad-input corpus: {total} requests\n" + json.dumps(report, indent=1))
    if os.environ.get("SALF_CORPUS_REPORT"):
        with open(os.environ["SALF_CORPUS_REPORT"], "w") as fh:
            json.dump({"total": total, "codes": report}, fh, indent=1)


def _region(pb, draw):
    kind = draw(st.sampled_from(["mask", "box", "points", "none"]))
    if kind == "mask":
        return pb.Region(mask_png=MASKS[draw(st.sampled_from(sorted(MASKS)))])
    if kind == "box":
        return pb.Region(box=pb.Box(x0=draw(floats), y0=draw(floats), x1=draw(floats), y1=draw(floats)))
    if kind == "points":
        pts = draw(st.lists(st.tuples(floats, floats), max_size=4))
        return pb.Region(points=pb.Points(points=[pb.Point(x=x, y=y) for x, y in pts], radius=draw(floats)))
    return None


def _check(conn, rpc: str, call) -> None:
    pb, stub, _ = conn
    try:
        call()
        code, details = "OK", ""
    except grpc.RpcError as exc:
        code, details = exc.code().name, exc.details() or ""
    TABLE[rpc][code] += 1
    assert code in ALLOWED, f"{rpc}: {code}: {details}"
    if code != "OK":
        assert 0 < len(details) < 1000, f"{rpc}: {code} with a message of {len(details)} characters"
    # the gateway is still fine
    assert len(stub.Predict(pb.PredictRequest(image=IMAGES["png"]), timeout=10).classes) == 3


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


@SETTINGS
@given(image=st.sampled_from(sorted(IMAGES)), top_k=top_ks)
def test_predict(conn, image, top_k):
    pb, stub, _ = conn
    _check(conn, "Predict", lambda: stub.Predict(pb.PredictRequest(image=IMAGES[image], top_k=top_k), timeout=10))


@SETTINGS
@given(data=st.data(), image=st.sampled_from(sorted(IMAGES)), top_k=top_ks,
       heatmaps=st.integers(-1, 6), target=st.sampled_from(["name", "index", "none"]))
def test_explain(conn, data, image, top_k, heatmaps, target):
    pb, stub, _ = conn
    req = pb.ExplainRequest(image=IMAGES[image], top_k=top_k, heatmaps=heatmaps)
    if target == "name":
        req.class_name = data.draw(names)
    elif target == "index":
        req.class_index = data.draw(indices)
    _check(conn, "Explain", lambda: stub.Explain(req, timeout=10))


@SETTINGS
@given(data=st.data(), image=st.sampled_from(["png", "jpeg", "zero-byte", "text", "exif-rotated"]),
       use_id=st.sampled_from(["valid", "unknown", "none"]), top_k=top_ks)
def test_explain_region(conn, data, image, use_id, top_k):
    pb, stub, _ = conn
    region = _region(pb, data.draw)
    explanation_id = {"none": "", "unknown": data.draw(names)}.get(use_id)
    if use_id == "valid":
        explanation_id = stub.Explain(pb.ExplainRequest(image=IMAGES["png"], heatmaps=pb.HEATMAP_FORMAT_NONE),
                                      timeout=10).explanation_id
    req = pb.ExplainRegionRequest(explanation_id=explanation_id, image=IMAGES[image] if use_id != "valid" else b"",
                                  top_k=top_k, region=region)
    _check(conn, "ExplainRegion", lambda: stub.ExplainRegion(req, timeout=10))


@SETTINGS
@given(data=st.data(), n_edits=st.integers(0, 4), top_k=top_ks, duplicate=st.booleans())
def test_intervene(conn, data, n_edits, top_k, duplicate):
    pb, stub, _ = conn
    edits = []
    for _ in range(n_edits):
        edit = pb.ConceptEdit(beta=data.draw(floats))
        if data.draw(st.booleans()):
            edit.concept_name = data.draw(names)
        else:
            edit.concept_index = data.draw(indices)
        region = _region(pb, data.draw)
        if region is not None:
            edit.region.CopyFrom(region)
        edits.append(edit)
    if duplicate and edits:
        edits.append(edits[0])
    req = pb.InterveneRequest(image=IMAGES["png"], edits=edits, top_k=top_k)
    _check(conn, "Intervene", lambda: stub.Intervene(req, timeout=10))


@SETTINGS
@given(name=names)
def test_class_rules(conn, name):
    pb, stub, _ = conn
    _check(conn, "GetClassRules", lambda: stub.GetClassRules(pb.GetClassRulesRequest(class_name=name), timeout=10))


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64), method=st.sampled_from(["Predict", "Explain", "ExplainRegion", "Intervene",
                                                           "GetClassRules", "GetModelInfo"]))
def test_undecodable_messages(conn, raw, method):
    _, _, channel = conn
    call = channel.unary_unary(f"/salf.v1.Gateway/{method}", request_serializer=None, response_deserializer=None)
    _check(conn, f"raw bytes -> {method}", lambda: call(raw, timeout=10))


def test_memory_stays_bounded_over_repeats(conn):
    """The heavy cases of the corpus again and again: RSS settles (the decoder's and numpy's arenas grow
    once) instead of growing with every request."""
    pb, stub, _ = conn
    heavy = [IMAGES[k] for k in ("huge-declared", "huge-declared-2", "cmyk", "16-bit", "animated", "truncated-png")]

    def rounds(n):
        for _ in range(n):
            for image in heavy:
                try:
                    stub.Explain(pb.ExplainRequest(image=image), timeout=10)
                except grpc.RpcError:
                    pass
            _check(conn, "memory repeats", lambda: stub.ExplainRegion(pb.ExplainRegionRequest(
                image=IMAGES["png"], region=pb.Region(mask_png=MASKS["ok"])), timeout=10))

    rounds(5)
    before = _rss_mb()
    rounds(20)
    grown = _rss_mb() - before
    assert grown < 50, f"RSS grew {grown:.0f} MB over 20 rounds of the heavy cases"
