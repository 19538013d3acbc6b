"""The paper's debugging story (sections 3.6 and 4.4, Figure 7) on the demo's model, in the explorer.

    python -m tests.e2e.explorer_story   (make ui-story, after make demo)

1. Find the demo test images the model gets wrong (test split, dataset order).
2. For each, the region is the key object's silhouette box (the synthetic set's own mask of the
   class's shape); Explain Anything says what the model sees there.
3. Raise each concept the true class's rule weighs positively, with beta = 1 inside that box, and keep
   the first image where the prediction flips to the true class.
4. Do the same by hand in the real explorer (headless Chromium): open the image from the folder
   strip, draw the box with the mouse, add the concept, beta 1; screenshot.

Writes ``runs/demo/explorer.png`` (the screenshot) and ``runs/demo/explorer-story.json`` (image, box,
region concepts, concept raised, prediction before and after, and what the page showed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle")


def object_box(masks: np.ndarray, concepts: list[str], class_name: str) -> list[float] | None:
    """Bounding box (x0, y0, x1, y1; pixel edges) of the class's key shape, from the dataset's masks."""
    shape = next((s for s in SHAPES if s in class_name), "circle")  # ball and balloon are circles
    m = masks[concepts.index(shape)]
    if not m.any():
        return None
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def find_story(client, data: Path) -> dict | None:
    classes = [c for c in (data / "classes.txt").read_text().split("\n") if c]
    all_concepts = [c for c in (data / "concepts.txt").read_text().split("\n") if c]
    rules = {r.class_name: [(t.concept_name, t.weight) for t in r.terms] for r in client.class_rules().rules}
    for true in classes:
        for path in sorted((data / "test" / true).glob("*.png")):
            image = path.read_bytes()
            before = client.predict(image, top_k=3)
            if before.classes[0].name == true:
                continue
            masks = np.load(data / "masks" / "test" / true / f"{path.stem}.npz")["masks"]
            box = object_box(masks, all_concepts, true)
            if box is None:
                continue
            region = client.region(box=box)
            seen = client.explain_region(region, image=image, top_k=5)
            for concept, weight in rules.get(true, []):
                if weight <= 0:
                    continue
                r = client.intervene([client.edit(region, 1.0, concept)], image=image, top_k=3)
                if r.predicted_after.name == true:
                    return {"image": str(path), "true_class": true, "box": box,
                            "region_concepts": [(a.name, round(a.activation, 3)) for a in seen.concepts],
                            "concept": concept, "beta": 1.0, "rule": rules[true],
                            "before": [(c.name, round(c.probability, 4)) for c in r.before],
                            "after": [(c.name, round(c.probability, 4)) for c in r.after]}
    return None


def in_browser(story: dict, ui_url: str, folder: Path, screenshot: Path) -> dict:
    from playwright.sync_api import sync_playwright

    from clients.ui.session import list_folder
    from tests.fixtures.browser import CHROMIUM, CHROMIUM_FLAGS, until

    index = list_folder(folder).index(Path(story["image"]))  # the explorer's own folder order

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(ui_url)
        until(page, "window.SalfUI && window.SalfUI.ready === true")
        page.click(f"#folder-list figure[data-index='{index}']")
        until(page, f"document.querySelector('#image-name').textContent.includes({Path(story['image']).name!r})")
        page.wait_for_selector("#concepts tbody tr[data-name]")
        r = page.evaluate("(() => { const r = document.querySelector('#region-canvas').getBoundingClientRect();"
                          " return [r.left, r.top, r.width]; })()")
        scale = r[2] / page.evaluate("SalfUI.state.image.width")
        x0, y0, x1, y1 = story["box"]
        # inside the box's edges by a quarter pixel, so the drawn box covers the same pixels
        page.mouse.move(r[0] + (x0 + 0.25) * scale, r[1] + (y0 + 0.25) * scale)
        page.mouse.down()
        page.mouse.move(r[0] + (x1 - 0.25) * scale, r[1] + (y1 - 0.25) * scale, steps=5)
        page.mouse.up()
        page.wait_for_selector("#region-concepts tbody tr[data-name]")
        page.select_option("#concept-select", story["concept"])
        until(page, "document.querySelector('#intervene-summary').dataset.after !== undefined && SalfUI.idle()")
        shown = {
            "prediction": page.text_content("#predictions tbody tr"),
            "region_concepts": page.evaluate("[...document.querySelectorAll('#region-concepts tbody tr')]"
                                             ".map(tr => tr.dataset.name)"),
            "intervention": page.text_content("#intervene-summary"),
        }
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return shown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)

    from clients.local import local_client
    from tests.fixtures.browser import start_salfctl_ui

    with local_client(args.repo) as client:
        story = find_story(client, args.data)
    if story is None:
        print("no misclassified test image flips with beta = 1 on one of its class's concepts", file=sys.stderr)
        return 1
    ui = start_salfctl_ui(args.out / "explorer-ui.log", ["-m", str(args.repo), "--images", str(args.data / "test")])
    try:
        story["page"] = in_browser(story, ui.url, args.data / "test", args.out / "explorer.png")
    finally:
        ui.stop()
    (args.out / "explorer-story.json").write_text(json.dumps(story, indent=1))
    print(json.dumps(story, indent=1))
    print(f"wrote {args.out / 'explorer.png'} and {args.out / 'explorer-story.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
