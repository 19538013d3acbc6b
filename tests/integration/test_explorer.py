"""`salfctl ui` in a real headless Chromium (Playwright) against a real gateway on a trained model.

1. the whole path: open a demo test image, draw a box on the canvas shown at 4x, compare the region's
   top concepts with the gateway's ExplainRegion for the same box, move the beta slider by keyboard
   and compare the class scores shown with the gateway's Intervene, download figure and JSON, save a
   screenshot;
2. an image dropped on the page; the gateway goes down and comes back: a readable error, then the page
   works again;
3. requests without the launch secret, from another origin, or under a foreign Host are refused.
"""
from __future__ import annotations

import io
import json
import os
import threading
from http.client import HTTPConnection
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from tests.fixtures.browser import page_errors, start_salfctl_ui, static_scripts, until as _until
from tests.fixtures.gateway import free_port, wait_for_health

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = Path(os.environ.get("SALF_UI_SCREENSHOT", ROOT / "runs" / "test-artifacts" / "explorer.png"))


@pytest.fixture(scope="module")
def trained_repo(trained_run, tmp_path_factory):
    from export.repository import export_repository

    out = tmp_path_factory.mktemp("explorer") / "model_repository"
    export_repository(trained_run / "bundle", out, flavour="python", parity=False)
    return out


def _gateway(repo: Path, port: int):
    from serving.server import GatewayServer, ServeConfig

    server = GatewayServer(ServeConfig(model_repository=repo, host="127.0.0.1", port=port, metrics_port=None,
                                       max_in_flight=8)).start()
    wait_for_health(f"127.0.0.1:{server.port}", 30.0)
    return server


@pytest.fixture(scope="module")
def gateway_url(trained_repo):
    server = _gateway(trained_repo, 0)
    yield f"127.0.0.1:{server.port}"
    server.stop(grace=0.5)


@pytest.fixture()
def client(gateway_url):
    from clients.client import SalfClient

    with SalfClient.connect(gateway_url) as c:
        yield c


def _test_image(synth_data: Path) -> Path:
    return sorted((synth_data / "test").rglob("*.png"))[0]


def _open_page(page, url: str) -> None:
    page.goto(url)
    _until(page, "window.SalfUI && window.SalfUI.ready === true")


def _load(page, image: Path) -> None:
    page.set_input_files("#file", str(image))
    _until(page, f"document.querySelector('#image-name').textContent.startsWith({image.name!r})")
    page.wait_for_selector("#concepts tbody tr[data-name]")


def _wait_idle(page) -> None:
    _until(page, "window.SalfUI.idle()")


def _drag(page, rect: dict, start: tuple[float, float], end: tuple[float, float]) -> None:
    page.mouse.move(rect["x"] + start[0], rect["y"] + start[1])
    page.mouse.down()
    page.mouse.move(rect["x"] + (start[0] + end[0]) / 2, rect["y"] + (start[1] + end[1]) / 2, steps=3)
    page.mouse.move(rect["x"] + end[0], rect["y"] + end[1], steps=3)
    page.mouse.up()


def _rect(page) -> dict:
    return page.evaluate("(() => { const r = document.querySelector('#region-canvas').getBoundingClientRect();"
                         " return {x: r.left, y: r.top, width: r.width, height: r.height}; })()")


def _rows(page, table: str) -> list[dict]:
    return page.evaluate(f"[...document.querySelectorAll('{table} tbody tr[data-name]')].map(tr => ({{...tr.dataset}}))")


def test_explorer_region_and_intervention_match_the_gateway(browser_page, gateway_url, client, synth_data, tmp_path):
    page = browser_page
    errors, scripts = page_errors(page), static_scripts(page)
    ui = start_salfctl_ui(tmp_path / "ui.log", ["-u", gateway_url, "--images", str(synth_data / "test")])
    try:
        _open_page(page, ui.url)
        assert "in-process" not in page.text_content("#model-info")
        # the page's ES modules: every one under static/ loaded, each as JavaScript
        static = ROOT / "clients" / "ui" / "static"
        assert set(scripts) == {f"/static/{p.relative_to(static).as_posix()}" for p in static.rglob("*.js")}, scripts
        assert all(t == "text/javascript; charset=utf-8" for t in scripts.values()), scripts
        image = _test_image(synth_data)
        _load(page, image)
        w, h = Image.open(image).size

        # the mapping from display to image pixels, on rects other than the canvas too
        for rect, point in [({"left": 10, "top": 20, "width": 448, "height": 448}, (122, 20)),
                            ({"left": 0.5, "top": 0, "width": 300, "height": 150}, (299.5, 75)),
                            ({"left": 0, "top": 0, "width": 100, "height": 100}, (-5, 120))]:
            got = page.evaluate("([r, p, w, h]) => SalfUI.displayToImage(p[0], p[1], r, w, h)",
                                [rect, point, 200, 100])
            x = min(max((point[0] - rect["left"]) * 200 / rect["width"], 0), 200)
            y = min(max((point[1] - rect["top"]) * 100 / rect["height"], 0), 100)
            assert got == pytest.approx({"x": x, "y": y})

        # a box drawn by mouse on the canvas shown at 4x
        rect = _rect(page)
        scale = rect["width"] / w
        assert scale == pytest.approx(448 / max(w, h)) and abs(scale - 1) > 0.5
        start, end = (37.0, 45.0), (301.0, 262.0)
        _drag(page, rect, start, end)
        page.wait_for_selector("#region-concepts tbody tr[data-name]")
        _wait_idle(page)
        sent = json.loads(page.get_attribute("#region-info", "data-region"))
        box = [start[0] / scale, start[1] / scale, end[0] / scale, end[1] / scale]
        assert sent["box"] == pytest.approx(box, abs=1e-3)

        shown = _rows(page, "#region-concepts")
        data = image.read_bytes()
        expected = client.explain_region(client.region(box=sent["box"]), image=data, top_k=8)
        assert [r["name"] for r in shown] == [c.name for c in expected.concepts]
        assert [float(r["activation"]) for r in shown] == pytest.approx([c.activation for c in expected.concepts],
                                                                        rel=1e-5, abs=1e-5)
        assert f"{expected.region_area} px" in page.text_content("#region-info")

        # pick the region's top concept and move beta with the keyboard, fast: debounced, one request at a time
        concept = shown[0]["name"]
        page.click(f"#region-concepts tbody tr[data-name='{concept}'] input.edit")
        _wait_idle(page)
        page.focus("#beta")
        for _ in range(15):
            page.keyboard.press("ArrowRight")
        _until(page, "document.querySelector('#intervene-summary').dataset.beta === '2.5'")
        _wait_idle(page)
        stats = page.evaluate("SalfUI.stats.intervene")
        assert stats["maxInFlight"] == 1
        assert stats["sent"] <= 4, stats  # 1 on picking the concept + the debounced slider, not 15

        after = client.intervene([client.edit(client.region(box=sent["box"]), 2.5, concept)], image=data,
                                 top_k=min(5, len(client.info.classes)))
        rows = _rows(page, "#intervention")
        assert rows, "no class scores shown"
        classes = list(client.info.classes)
        for r in rows:
            i = classes.index(r["name"])
            assert float(r["logitBefore"]) == pytest.approx(after.logits_before[i], abs=1e-4)
            assert float(r["logitAfter"]) == pytest.approx(after.logits_after[i], abs=1e-4)
        assert {r["name"] for r in rows} == {c.name for c in after.before} | {c.name for c in after.after}
        summary = page.text_content("#intervene-summary")
        assert after.predicted_before.name in summary and after.predicted_after.name in summary

        # downloads: the composed figure and the JSON of what is on screen
        with page.expect_download() as dl:
            page.click("#download-figure")
        fig = Image.open(io.BytesIO(Path(dl.value.path()).read_bytes()))
        assert fig.format == "PNG" and fig.width > 2 * 256
        with page.expect_download() as dl:
            page.click("#download-json")
        doc = json.loads(Path(dl.value.path()).read_text())
        assert doc["region"]["box"] == pytest.approx(sent["box"])
        assert doc["intervention"]["beta"] == 2.5 and doc["intervention"]["concepts"] == [concept]
        assert [c["name"] for c in doc["region_concepts"]["concepts"]] == [c.name for c in expected.concepts]

        # the rules shown are the gateway's for the explained class
        target = page.evaluate("SalfUI.state.explanation.target.name")
        rule = client.class_rules(target).rules[0]
        assert [r["name"] for r in _rows(page, "#rules")] == [t.concept_name for t in rule.terms]

        # points and brush regions: the page's pixels are the gateway's
        page.check("input[name=tool][value=points]")
        rect = _rect(page)  # checking the radio may have scrolled the page
        page.mouse.click(rect["x"] + 101, rect["y"] + 203)
        _until(page, "document.querySelector('#region-info').textContent.includes(' -- ')")
        _wait_idle(page)
        pts = json.loads(page.get_attribute("#region-info", "data-region"))
        assert pts["points"][0] == pytest.approx([101 / scale, 203 / scale], abs=1e-3)
        expected = client.explain_region(client.region(points=pts["points"], radius=pts["radius"]), image=data, top_k=8)
        assert [r["name"] for r in _rows(page, "#region-concepts")] == [c.name for c in expected.concepts]
        assert f"-- {expected.region_area} px" in page.text_content("#region-info")
        page.check("input[name=tool][value=brush]")
        rect = _rect(page)
        _drag(page, rect, (60, 300), (380, 330))
        _until(page, "document.querySelector('#region-info').textContent.includes(' -- ')")
        _wait_idle(page)
        brushed = page.evaluate("SalfUI.state.brush.reduce((a, b) => a + b, 0)")
        assert 0 < brushed < w * h
        assert f"-- {brushed} px" in page.text_content("#region-info")

        # gallery: the folder's images ranked by the chosen concept's c*
        page.select_option("#gallery-select", concept)
        page.wait_for_selector("#gallery figure")
        _wait_idle(page)
        assert page.locator("#gallery figure").count() == 8
        assert "unreachable" not in (page.text_content("#error-text") or "")

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        assert Image.open(SCREENSHOT).width >= 1000
        assert errors == [], errors  # nothing failed in the page: no console error, no uncaught exception
    finally:
        ui.stop()
    assert "Traceback" not in ui.log(), ui.log()


def test_explorer_reports_a_gateway_outage_and_recovers(browser_page, trained_repo, synth_data, tmp_path):
    page = browser_page
    port = free_port()
    gateway = _gateway(trained_repo, port)
    ui = start_salfctl_ui(tmp_path / "ui.log", ["-u", f"127.0.0.1:{port}"])
    try:
        _open_page(page, ui.url)
        image = _test_image(synth_data)  # dropped on the page this time, as a file dragged from a file manager
        page.evaluate("""([bytes, name]) => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], name, {type: "image/png"}));
            document.querySelector("#stage").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true,
                                                                                  cancelable: true}));
        }""", [list(image.read_bytes()), image.name])
        _until(page, f"document.querySelector('#image-name').textContent.startsWith({image.name!r})")
        page.wait_for_selector("#concepts tbody tr[data-name]")
        rect = _rect(page)

        gateway.stop(grace=0.2)
        _drag(page, rect, (40, 40), (200, 200))
        page.wait_for_selector("#error:not([hidden])")
        message = page.text_content("#error-text")
        assert "UNAVAILABLE" in message and "unreachable" in message, message
        assert page.locator("#region-concepts tbody tr").count() == 0
        page.click("#region-clear")  # the page still answers the user

        gateway = _gateway(trained_repo, port)  # same port: the explorer's channel reconnects
        assert _rect(page) == rect  # the error banner did not move the canvas
        _drag(page, rect, (60, 60), (300, 260))
        try:
            page.wait_for_selector("#region-concepts tbody tr[data-name]", timeout=20_000)
        except Exception:
            raise AssertionError(f"no region answer after the restart; page error: "
                                 f"{page.text_content('#error-text')!r}; explorer log: {ui.log()}")
        _wait_idle(page)
        assert page.is_hidden("#error")
    finally:
        ui.stop()
        gateway.stop(grace=0.2)


class _Foreign(SimpleHTTPRequestHandler):
    """Another site on this machine: a page whose script calls the explorer."""
    page = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.page)))
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args):
        pass


def test_explorer_refuses_requests_without_secret_or_from_another_origin(browser_page, trained_repo, synth_data,
                                                                         tmp_path):
    page = browser_page
    ui = start_salfctl_ui(tmp_path / "ui.log", ["-m", str(trained_repo)])  # in-process gateway
    foreign = None
    try:
        # no secret: the page is not served
        response = page.goto(ui.base + "/")
        assert response.status == 403
        assert "launch secret" in page.content()
        response = page.goto(ui.base + "/?secret=wrong-secret-0123456789")
        assert response.status == 403

        # with it: served; the cookie it sets is what a foreign page on another local port would ride on
        _open_page(page, ui.url)
        _load(page, _test_image(synth_data))
        before = ui.log().count("refused")

        _Foreign.page = f"""<!doctype html><script>
          window.results = [];
          async function attack() {{
            for (const [path, init] of [["/api/info", {{}}],
                                        ["/api/image", {{method: "POST", body: "x", mode: "no-cors"}}],
                                        ["/api/rules?class=", {{mode: "no-cors"}}]]) {{
              try {{ const r = await fetch("{ui.base}" + path, {{credentials: "include", ...init}});
                     results.push(r.type + ":" + r.status); }}
              catch (e) {{ results.push("blocked"); }}
            }}
            const img = new Image(); img.src = "{ui.base}/api/info";
            await new Promise(r => {{ img.onload = img.onerror = r; }});
            window.done = true;
          }}
          attack();
        </script>""".encode()
        foreign = ThreadingHTTPServer(("127.0.0.1", 0), _Foreign)
        threading.Thread(target=foreign.serve_forever, daemon=True).start()
        other = page.context.new_page()
        other.goto(f"http://127.0.0.1:{foreign.server_address[1]}/")
        _until(other, "window.done === true")
        results = other.evaluate("window.results")
        assert "basic:200" not in results and "cors:200" not in results, results
        log = ui.log()
        assert log.count("refused") - before >= 4, log
        assert "Origin 'http://127.0.0.1:" in log

        # DNS rebinding: a foreign name resolving to 127.0.0.1 carries that name in Host
        conn = HTTPConnection("127.0.0.1", ui.port, timeout=10)
        secret = ui.url.split("secret=", 1)[1]
        conn.request("GET", "/api/info", headers={"Host": f"attacker.example:{ui.port}", "X-Salf-Secret": secret})
        r = conn.getresponse()
        assert r.status == 403 and b"Host" in r.read()
        conn.close()  # a refused request's connection is closed by the explorer
        conn = HTTPConnection("127.0.0.1", ui.port, timeout=10)
        conn.request("GET", "/api/info", headers={"X-Salf-Secret": secret})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["model"]["classes"]
        conn.close()

        # the page itself still works after all that
        page.reload()
        _until(page, "window.SalfUI && window.SalfUI.ready === true")
        assert page.is_hidden("#error")
    finally:
        if foreign is not None:
            foreign.shutdown()
        ui.stop()
