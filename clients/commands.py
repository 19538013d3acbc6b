"""Client commands of `salfctl`: predict, explain (with --roi: Explain Anything), intervene, rules, info.

With ``-u/--url`` they talk to a gateway; without, they start one in this process on a local
``--model-repository``. Before sending anything they check the gateway's health, metadata and
backend readiness and exit non-zero with a clear message when that fails (STYLE 9).

Exit codes: 0 success; 1 a request failed (the message names the image and the gRPC status);
2 bad command line; 3 the gateway (or its backend) is unreachable or not ready.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

EXIT_FAILED = 1
EXIT_UNREACHABLE = 3

URL = typer.Option(None, "-u", "--url", envvar="SALF_URL",
                   help="Gateway HOST:PORT. Without it, a gateway runs in-process on --model-repository.")
REPO = typer.Option(Path("model_repository"), "--model-repository", "-m",
                    help="Local model repository used when no --url is given.")
TIMEOUT = typer.Option(30.0, "--timeout", help="Deadline of each request, seconds.")
TOKEN = typer.Option(None, "--token", envvar="SALF_TOKEN", help="Bearer token for a gateway with auth.")
CA_CERT = typer.Option(None, "--ca-cert", help="PEM root certificate: connect with TLS.")
JSON = typer.Option(False, "--json", help="JSON Lines on stdout (one object per image) instead of tables.")
TOP_K = typer.Option(0, "--top-k", "-k", help="How many classes/concepts (0: the gateway's default, 5).")


def _err(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def _connect(url, model_repository, timeout, token, ca_cert):
    """A checked client, or exit 3 with the reason."""
    import grpc

    from .client import GatewayUnavailable, SalfClient

    try:
        if url:
            return SalfClient.connect(url, timeout=timeout, token=token, ca_cert=ca_cert)
        return SalfClient.local(model_repository, timeout=timeout)
    except GatewayUnavailable as exc:
        _err(str(exc))
    except grpc.RpcError as exc:
        _err(f"the gateway at {url} refused the model-info request: {exc.code().name}: {exc.details()}")
    except (OSError, ValueError) as exc:  # a missing or broken local model repository
        _err(f"cannot start a local gateway on {model_repository}: {exc}")
    raise typer.Exit(EXIT_UNREACHABLE)


def _progress(items, what: str):
    from tqdm import tqdm

    return tqdm(items, desc=what, unit="image", file=sys.stderr, disable=len(items) < 2, leave=False)


def _rpc_error(image, exc) -> dict:
    return {"image": str(image), "error": {"code": exc.code().name, "message": exc.details()}}


def _class_dict(c) -> dict:
    return {"index": c.index, "name": c.name, "probability": c.probability, "logit": c.logit}


def _activation_dict(a) -> dict:
    return {"index": a.index, "name": a.name, "activation": a.activation, "mean_activation": a.mean_activation}


def _emit(rows: list[dict], as_json: bool, table_fn) -> int:
    """Print results (JSON Lines or tables) and errors; returns the exit code."""
    from rich.console import Console

    console = Console()
    failed = 0
    for row in rows:
        if "error" in row:
            failed += 1
            _err(f"{row['image']}: {row['error']['code']}: {row['error']['message']}")
            if as_json:
                print(json.dumps(row), flush=True)
        elif as_json:
            print(json.dumps(row), flush=True)
        else:
            table_fn(console, row)
    return EXIT_FAILED if failed else 0


def _numbers(text: str, n: int, flag: str, form: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise typer.BadParameter(f"{flag} must be {form} in pixels, got {text!r}")
    return values


def _region(client, roi: Optional[Path], box: Optional[str], points: Optional[List[str]] = None, radius: float = 0.0):
    """The ROI message from exactly one of --roi, --box, --point (or None when none is given)."""
    given = [x for x in (roi, box, points or None) if x is not None]
    if len(given) > 1:
        raise typer.BadParameter("give only one of --roi, --box, --point")
    if roi is not None:
        return client.region(mask_png=roi.read_bytes())
    if box is not None:
        return client.region(box=_numbers(box, 4, "--box", "x0,y0,x1,y1"))
    if points:
        return client.region(points=[_numbers(p, 2, "--point", "x,y") for p in points], radius=radius)
    return None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "concept"


# ------------------------------------------------------------------ commands

def predict(images: List[Path] = typer.Argument(..., exists=True, dir_okay=False, help="Image files."),
            top_k: int = TOP_K, url: Optional[str] = URL, model_repository: Path = REPO,
            timeout: float = TIMEOUT, token: Optional[str] = TOKEN, ca_cert: Optional[Path] = CA_CERT,
            as_json: bool = JSON) -> None:
    """Top-k classes with probabilities for each image."""
    import grpc

    rows = []
    with _connect(url, model_repository, timeout, token, ca_cert) as client:
        for image in _progress(images, "predict"):
            try:
                r = client.predict(image.read_bytes(), top_k=top_k)
                rows.append({"image": str(image), "classes": [_class_dict(c) for c in r.classes]})
            except grpc.RpcError as exc:
                rows.append(_rpc_error(image, exc))

    def table(console, row):
        from rich.table import Table

        t = Table(title=row["image"])
        for col in ("rank", "class", "probability", "logit"):
            t.add_column(col, justify="right" if col != "class" else "left")
        for n, c in enumerate(row["classes"], 1):
            t.add_row(str(n), c["name"], f"{c['probability']:.4f}", f"{c['logit']:+.3f}")
        console.print(t)

    raise typer.Exit(_emit(rows, as_json, table))


def explain(images: List[Path] = typer.Argument(..., exists=True, dir_okay=False, help="Image files."),
            roi: Optional[Path] = typer.Option(None, "--roi", exists=True, dir_okay=False,
                                               help="ROI mask (PNG, the image's size): also Explain Anything."),
            box: Optional[str] = typer.Option(None, "--box", help="ROI as a box x0,y0,x1,y1 (pixels)."),
            class_name: Optional[str] = typer.Option(None, "--class", help="Explain this class, not the predicted one."),
            top_k: int = TOP_K,
            out: Optional[Path] = typer.Option(None, "--out", "-o", file_okay=False,
                                               help="Write heatmap overlays (jet over the image) and the ROI outline here."),
            url: Optional[str] = URL, model_repository: Path = REPO, timeout: float = TIMEOUT,
            token: Optional[str] = TOKEN, ca_cert: Optional[Path] = CA_CERT, as_json: bool = JSON) -> None:
    """Top-k concepts by contribution S = W(class, m) * c*(m) with heatmaps; --roi/--box adds Explain Anything.

    With a region, the top concepts by aggregated activation inside it are listed too, and the
    overlays under --out carry the region's outline.
    """
    import grpc

    rows = []
    with _connect(url, model_repository, timeout, token, ca_cert) as client:
        region = _region(client, roi, box)
        for image in _progress(images, "explain"):
            try:
                rows.append(_explain_one(client, image, region, class_name, top_k, out))
            except grpc.RpcError as exc:
                rows.append(_rpc_error(image, exc))

    def table(console, row):
        from rich.table import Table

        t = Table(title=f"{row['image']}: {row['target']['name']} (p={row['target']['probability']:.3f})")
        for col in ("rank", "concept", "contribution", "weight", "score"):
            t.add_column(col, justify="left" if col == "concept" else "right")
        for n, c in enumerate(row["concepts"], 1):
            t.add_row(str(n), c["name"], f"{c['contribution']:+.4f}", f"{c['weight']:+.4f}", f"{c['score']:+.3f}")
        console.print(t)
        if "region" in row:
            r = Table(title=f"region of {row['region']['area']} px: concepts by activation")
            for col in ("rank", "concept", "activation", "mean"):
                r.add_column(col, justify="left" if col == "concept" else "right")
            for n, a in enumerate(row["region"]["concepts"], 1):
                r.add_row(str(n), a["name"], f"{a['activation']:+.3f}", f"{a['mean_activation']:+.4f}")
            console.print(r)
        for f in row.get("files", []):
            console.print(f"wrote {f}")

    raise typer.Exit(_emit(rows, as_json, table))


def _explain_one(client, image: Path, region, class_name, top_k, out: Optional[Path]) -> dict:
    from . import render

    data = image.read_bytes()
    r = client.explain(data, class_name=class_name, top_k=top_k, heatmaps="png" if out else "none")
    row = {"image": str(image), "explanation_id": r.explanation_id, "target": _class_dict(r.target),
           "predictions": [_class_dict(c) for c in r.predictions],
           "concepts": [{"index": c.index, "name": c.name, "contribution": c.contribution, "weight": c.weight,
                         "score": c.score} for c in r.concepts]}
    if region is not None:
        rr = _region_by_id(client, region, r.explanation_id, data, top_k)
        row["region"] = {"area": rr.region_area, "concepts": [_activation_dict(a) for a in rr.concepts]}
    if out is not None:
        rgb = render.load_rgb(data)
        mask = _region_mask(region, rgb.shape[:2])
        files = []
        for n, c in enumerate(r.concepts, 1):
            picture = render.overlay(rgb, render.heatmap_values(c.heatmap))
            if mask is not None:
                picture = render.draw_outline(picture, mask)
            files.append(render.save_png(out / f"{image.stem}.{n:02d}.{_slug(c.name)}.png", picture))
            row["concepts"][n - 1]["overlay"] = str(files[-1])
        if mask is not None:
            files.append(render.save_png(out / f"{image.stem}.roi.png", render.draw_outline(rgb, mask, (255, 0, 0))))
        row["files"] = [str(f) for f in files]
    return row


def _region_by_id(client, region, explanation_id: str, data: bytes, top_k: int):
    """ExplainRegion on the cached maps; resend the image only if the id expired meanwhile."""
    import grpc

    try:
        return client.explain_region(region, explanation_id=explanation_id, top_k=top_k)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return client.explain_region(region, explanation_id=explanation_id, image=data, top_k=top_k)


def _region_mask(region, size):
    """The client's own picture of the region (for the outline): mask or box as bool ``[h, w]``."""
    import io

    import numpy as np
    from PIL import Image

    if region is None:
        return None
    if region.WhichOneof("kind") == "mask_png":
        mask = np.asarray(Image.open(io.BytesIO(region.mask_png)).convert("L")) > 0
        return mask if mask.shape == tuple(size) else None
    b = region.box
    ys, xs = np.arange(size[0]) + 0.5, np.arange(size[1]) + 0.5
    return ((ys >= b.y0) & (ys < b.y1))[:, None] & ((xs >= b.x0) & (xs < b.x1))[None, :]


def intervene(image: Path = typer.Argument(..., exists=True, dir_okay=False, help="Image file."),
              roi: Optional[Path] = typer.Option(None, "--roi", exists=True, dir_okay=False, help="Region mask (PNG)."),
              box: Optional[str] = typer.Option(None, "--box", help="Region as x0,y0,x1,y1 (pixels)."),
              concept: str = typer.Option(..., "--concept", help="Concept name (or index) to edit."),
              beta: float = typer.Option(..., "--beta", help="c[m] += beta * I in the region; positive or negative."),
              top_k: int = TOP_K, url: Optional[str] = URL, model_repository: Path = REPO,
              timeout: float = TIMEOUT, token: Optional[str] = TOKEN, ca_cert: Optional[Path] = CA_CERT,
              as_json: bool = JSON) -> None:
    """Local intervention: edit one concept's map in a region, re-run the head, show the change."""
    import grpc

    rows = []
    with _connect(url, model_repository, timeout, token, ca_cert) as client:
        region = _region(client, roi, box)
        if region is None:
            raise typer.BadParameter("intervene needs a region: --roi or --box")
        target = concept if concept in client.info.concepts or not concept.isdigit() else int(concept)
        try:
            r = client.intervene([client.edit(region, beta, target)], image=image.read_bytes(), top_k=top_k)
            name = client.info.concepts[target] if isinstance(target, int) and target < len(client.info.concepts) else concept
            rows.append({"image": str(image), "concept": name, "beta": beta,
                         "predicted_before": _class_dict(r.predicted_before),
                         "predicted_after": _class_dict(r.predicted_after),
                         "before": [_class_dict(c) for c in r.before], "after": [_class_dict(c) for c in r.after],
                         "logits_before": list(r.logits_before), "logits_after": list(r.logits_after),
                         "logit_deltas": dict(zip(client.info.classes, r.logit_deltas)),
                         "region_concepts": [_activation_dict(a) for a in r.region_concepts]})
        except grpc.RpcError as exc:
            rows.append(_rpc_error(image, exc))

    def table(console, row):
        from rich.table import Table

        b, a = row["predicted_before"], row["predicted_after"]
        t = Table(title=f"{row['image']}: {row['concept']} += {row['beta']:g} in the region: "
                        f"{b['name']} ({b['probability']:.3f}) -> {a['name']} ({a['probability']:.3f})")
        for col in ("class", "logit before", "logit after", "delta"):
            t.add_column(col, justify="left" if col == "class" else "right")
        for (name, d), lb, la in zip(row["logit_deltas"].items(), row["logits_before"], row["logits_after"]):
            t.add_row(name, f"{lb:+.4f}", f"{la:+.4f}", f"{d:+.4f}")
        console.print(t)
        r = Table(title="edited region: concepts by activation")
        for col in ("rank", "concept", "activation"):
            r.add_column(col, justify="left" if col == "concept" else "right")
        for n, c in enumerate(row["region_concepts"], 1):
            r.add_row(str(n), c["name"], f"{c['activation']:+.3f}")
        console.print(r)

    raise typer.Exit(_emit(rows, as_json, table))


def explain_region(images: List[Path] = typer.Argument(..., exists=True, dir_okay=False, help="Image files."),
                   roi: Optional[Path] = typer.Option(None, "--roi", exists=True, dir_okay=False,
                                                      help="ROI mask (PNG, the image's size)."),
                   box: Optional[str] = typer.Option(None, "--box", help="ROI as x0,y0,x1,y1 (pixels)."),
                   point: Optional[List[str]] = typer.Option(None, "--point", help="ROI point x,y (repeatable)."),
                   radius: float = typer.Option(0.0, "--radius", help="Point radius in pixels (0: the model's prompt radius)."),
                   top_k: int = TOP_K, url: Optional[str] = URL, model_repository: Path = REPO,
                   timeout: float = TIMEOUT, token: Optional[str] = TOKEN, ca_cert: Optional[Path] = CA_CERT,
                   as_json: bool = JSON) -> None:
    """Explain Anything: top concepts by aggregated activation inside a mask, box or points."""
    import grpc

    rows = []
    with _connect(url, model_repository, timeout, token, ca_cert) as client:
        region = _region(client, roi, box, point, radius)
        if region is None:
            raise typer.BadParameter("explain-region needs a region: --roi, --box or --point")
        for image in _progress(images, "explain-region"):
            try:
                r = client.explain_region(region, image=image.read_bytes(), top_k=top_k)
                rows.append({"image": str(image), "explanation_id": r.explanation_id, "area": r.region_area,
                             "concepts": [_activation_dict(a) for a in r.concepts]})
            except grpc.RpcError as exc:
                rows.append(_rpc_error(image, exc))

    def table(console, row):
        from rich.table import Table

        t = Table(title=f"{row['image']}: region of {row['area']} px, concepts by activation")
        for col in ("rank", "concept", "activation", "mean"):
            t.add_column(col, justify="left" if col == "concept" else "right")
        for n, a in enumerate(row["concepts"], 1):
            t.add_row(str(n), a["name"], f"{a['activation']:+.3f}", f"{a['mean_activation']:+.4f}")
        console.print(t)

    raise typer.Exit(_emit(rows, as_json, table))


def rules(class_name: Optional[str] = typer.Option(None, "--class", help="Only this class."),
          url: Optional[str] = URL, model_repository: Path = REPO, timeout: float = TIMEOUT,
          token: Optional[str] = TOKEN, ca_cert: Optional[Path] = CA_CERT, as_json: bool = JSON) -> None:
    """Global decision rules: each class's non-zero concept weights, largest |weight| first."""
    import grpc

    with _connect(url, model_repository, timeout, token, ca_cert) as client:
        try:
            r = client.class_rules(class_name or "")
        except grpc.RpcError as exc:
            _err(f"{exc.code().name}: {exc.details()}")
            raise typer.Exit(EXIT_FAILED)
    rows = [{"class": rule.class_name, "index": rule.class_index, "bias": rule.bias,
             "terms": [{"concept": t.concept_name, "index": t.concept_index, "weight": t.weight} for t in rule.terms]}
            for rule in r.rules]

    def table(console, row):
        from rich.table import Table

        t = Table(title=f"{row['class']} (bias {row['bias']:+.4f}, {len(row['terms'])} concepts)")
        t.add_column("concept")
        t.add_column("weight", justify="right")
        for term in row["terms"]:
            t.add_row(term["concept"], f"{term['weight']:+.4f}")
        console.print(t)

    raise typer.Exit(_emit(rows, as_json, table))


def info(url: Optional[str] = URL, model_repository: Path = REPO, timeout: float = TIMEOUT,
         token: Optional[str] = TOKEN, ca_cert: Optional[Path] = CA_CERT, as_json: bool = JSON) -> None:
    """The served model: concepts, classes, grid, input size, backend."""
    with _connect(url, model_repository, timeout, token, ca_cert) as client:
        i = client.info
    row = {"backend": i.backend, "backend_target": i.backend_target, "backend_ready": i.backend_ready,
           "input_size": [i.input_height, i.input_width], "grid": [i.grid_height, i.grid_width],
           "pooling": i.pooling, "radius": i.radius, "flavour": i.flavour, "bundle_sha256": i.bundle_sha256,
           "classes": list(i.classes), "concepts": list(i.concepts)}

    def table(console, row):
        from rich.table import Table

        t = Table(title="model", show_header=False)
        for key, value in row.items():
            t.add_row(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
        console.print(t)

    raise typer.Exit(_emit([row], as_json, table))


def register(app: typer.Typer) -> None:
    """Add this part's commands to the top-level `salfctl` app."""
    app.command("predict")(predict)
    app.command("explain")(explain)
    app.command("explain-region")(explain_region)
    app.command("intervene")(intervene)
    app.command("rules")(rules)
    app.command("info")(info)
