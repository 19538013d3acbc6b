"""Client commands of `salfctl`: predict, explain (with a region: Explain Anything), explain-region,
intervene, rules, info.

With ``-u/--url`` they talk to a gateway; without, they start one in this process on a local
``--model-repository``. Before sending anything they check the gateway's health, metadata and backend
readiness (STYLE 9). Every command takes the same path: connect -> one request per input -> a row per
result -> tables or JSON Lines -> exit code (salf/cli.py: 0 ok, 1 a request failed, 2 usage,
3 unreachable).

JSON rows are the response messages in protobuf's JSON mapping with the proto field names
(``json_format.MessageToDict``; heatmap bytes left out), plus the input's path under ``"image"`` and a
few conveniences named in each command's docstring.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Callable, List, Optional

import typer

from salf.cli import (DEFAULT_REPO, DEFAULT_TIMEOUT, EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, CaCert, CliError, Json,
                  Repo, Timeout, Token, TopK, Url, command)

COMMANDS = ("predict", "explain", "explain-region", "intervene", "rules", "info", "monitor")

Images = Annotated[List[Path], typer.Argument(exists=True, help="Image files, or folders (walked recursively, "
                                                                "in path order).")]
InFlight = Annotated[int, typer.Option("--in-flight", help="Requests kept in flight; files are read while "
                                                           "others are answered. Results keep the input order.")]
Output = Annotated[Optional[Path], typer.Option("--output", "-O", dir_okay=False,
                                                help="Write the JSON Lines here (one row per image, flushed as "
                                                     "each finishes) instead of stdout.")]
Resume = Annotated[bool, typer.Option("--resume", help="With --output: keep its rows and skip the images it "
                                                       "already answered without error (a stopped run goes on).")]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
Roi = Annotated[Optional[Path], typer.Option("--roi", exists=True, dir_okay=False,
                                             help="Region mask (PNG at the image's size; docs: gateway.proto Region).")]
Box = Annotated[Optional[str], typer.Option("--box", help="Region as a box x0,y0,x1,y1 (pixels).")]
Points = Annotated[Optional[List[str]], typer.Option("--point", help="Region point x,y in pixels (repeatable).")]
Radius = Annotated[float, typer.Option("--radius", help="Point radius in pixels (0: the model's prompt radius).")]


# ------------------------------------------------------------------ one path: connect, rows, output

def _connect(url, model_repository, timeout, token, ca_cert):
    """A checked client (fail fast), or :class:`CliError` with exit code 3 and the reason."""
    import grpc

    from .client import GatewayUnavailable, SalfClient
    from .local import local_client

    try:
        if url:
            return SalfClient.connect(url, timeout=timeout, token=token, ca_cert=ca_cert)
        return local_client(model_repository, timeout=timeout)
    except GatewayUnavailable as exc:
        raise CliError(str(exc), EXIT_UNREACHABLE) from exc
    except grpc.RpcError as exc:
        raise CliError(f"the gateway at {url} refused the model-info request: {exc.code().name}: {exc.details()}",
                       EXIT_UNREACHABLE) from exc
    except (OSError, ValueError) as exc:  # a missing or broken local model repository
        raise CliError(f"cannot start a local gateway on {model_repository}: {exc}", EXIT_UNREACHABLE) from exc


def message_dict(message, drop: tuple[str, ...] = ("heatmap",)) -> dict:
    """A response message as a JSON-ready dict (proto field names, defaults included), without ``drop``."""
    from google.protobuf import json_format

    doc = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)

    def prune(node):
        if isinstance(node, dict):
            return {k: prune(v) for k, v in node.items() if k not in drop}
        if isinstance(node, list):
            return [prune(v) for v in node]
        return node
    return prune(doc)


def _error_row(item, exc) -> dict:
    return {"image": str(item), "error": {"code": exc.code().name, "message": exc.details()}}


def folder_files(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The files under ``folder`` with ``suffixes`` (any case), recursive, sorted by path."""
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)


def expand_inputs(paths: list[Path], suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """Files as given; each folder replaced by its files with ``suffixes`` (recursive, sorted by path).
    A folder with none of them is a usage error."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = folder_files(p, suffixes)
            if not found:
                raise typer.BadParameter(f"{p} holds no {', '.join(suffixes)} file")
            out.extend(found)
        else:
            out.append(p)
    return out


def _rows(client, inputs: list, what: str, request: Callable, in_flight: int = 1):
    """``request(client, item) -> dict`` for each input, yielded in input order; a failed RPC becomes an
    error row. ``in_flight > 1``: that many requests run at once (threads; each reads its file too)."""
    import grpc
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def one(item):
        try:
            return {"image": str(item), **request(client, item)}
        except grpc.RpcError as exc:
            return _error_row(item, exc)

    bar = tqdm(total=len(inputs), desc=what, unit="image", file=sys.stderr, disable=len(inputs) < 2, leave=False)
    if in_flight <= 1:
        for item in inputs:
            yield one(item)
            bar.update(1)
    else:
        window: deque = deque()
        with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="salfctl") as pool:
            for item in inputs:
                window.append(pool.submit(one, item))
                if len(window) >= 2 * in_flight:  # a bounded read-ahead, whatever the input count
                    yield window.popleft().result()
                    bar.update(1)
            while window:
                yield window.popleft().result()
                bar.update(1)
    bar.close()


def _stream_rows(client, inputs: list[Path], what: str, request: Callable, finish: Callable, window: int):
    """Offline scoring on one ``Stream`` call (docs/DESIGN.md "Streaming"): ``request(data) -> PredictRequest
    | ExplainRequest`` per file, read as the gateway takes them; ``finish(item, data, response) -> dict``
    per answer; rows yielded in input order (answers come in completion order, at most ``window`` apart).
    A failed item is an error row; if the stream itself fails, every item not answered yet is one."""
    import grpc
    from tqdm import tqdm

    rows: dict[int, dict] = {}  # answered, not yet yielded (written by the sending thread for unreadable files)
    data: dict[int, bytes] = {}

    def items():
        for n, item in enumerate(inputs):
            try:
                data[n] = item.read_bytes()
            except OSError as exc:
                rows[n] = {"image": str(item), "error": {"code": "UNREADABLE", "message": str(exc)}}
                continue
            yield str(n), request(data[n])

    bar = tqdm(total=len(inputs), desc=what, unit="image", file=sys.stderr, disable=len(inputs) < 2, leave=False)
    following = 0
    try:
        for response in client.stream(items(), window=window):
            n = int(response.id)
            item = inputs[n]
            if response.WhichOneof("result") == "error":
                rows[n] = {"image": str(item), "error": {"code": response.error.code, "message": response.error.message}}
            else:
                try:
                    rows[n] = {"image": str(item), **finish(item, data[n], getattr(response, response.WhichOneof("result")))}
                except grpc.RpcError as exc:  # a follow-up call (a region) failed: this item only
                    rows[n] = _error_row(item, exc)
            del data[n]
            while following in rows:
                yield rows.pop(following)
                following += 1
                bar.update(1)
    except grpc.RpcError as exc:
        for n in range(following, len(inputs)):
            rows.setdefault(n, _error_row(inputs[n], exc))
    for n in range(following, len(inputs)):  # the stream ended: what is left, in order
        yield rows.pop(n)
        bar.update(1)
    bar.close()


def _resumable(inputs: list[Path], output: Optional[Path], resume: bool, in_flight: int) -> list[Path]:
    """Usage checks of --output/--resume/--in-flight; the inputs still to do (all, unless resuming)."""
    if in_flight < 1:
        raise typer.BadParameter("--in-flight must be >= 1")
    if resume and output is None:
        raise typer.BadParameter("--resume needs --output FILE")
    if output is None or not output.exists() or output.stat().st_size == 0:
        return inputs
    if not resume:
        raise CliError(f"{output} already exists: pass --resume to go on with it, or choose another --output",
                       EXIT_USAGE)
    data = output.read_bytes()
    if not data.endswith(b"\n"):  # a run killed mid-row: drop the partial row (its image is done again)
        with open(output, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    done = set()
    for line in output.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "error" not in row and "image" in row:
            done.add(row["image"])
    todo = [p for p in inputs if str(p) not in done]
    typer.echo(f"resuming {output}: {len(inputs) - len(todo)} of {len(inputs)} images already answered", err=True)
    return todo


def _emit(rows, as_json: bool, table: Callable, output: Optional[Path] = None) -> int:
    """Print results as they come (JSON Lines or tables; with ``output``, JSON Lines appended to that
    file, flushed per row) and errors; returns the number of errors."""
    from rich.console import Console

    console = Console()
    failed = 0
    sink = open(output, "a") if output is not None else None
    try:
        for row in rows:
            if "error" in row:
                failed += 1
                typer.echo(f"error: {row['image']}: {row['error']['code']}: {row['error']['message']}", err=True)
            if sink is not None:
                sink.write(json.dumps(row) + "\n")
                sink.flush()
            elif as_json:
                print(json.dumps(row), flush=True)
            elif "error" not in row:
                table(console, row)
    finally:
        if sink is not None:
            sink.close()
    return failed


def _run(conn: tuple, as_json: bool, table: Callable, produce: Callable, output: Optional[Path] = None) -> None:
    """Connect with ``conn = (url, repo, timeout, token, ca_cert)``; print the rows of ``produce(client)``
    as they come (a long video streams its records); exit 1 if any row is an error."""
    with _connect(*conn) as client:
        failed = _emit(produce(client), as_json, table, output)
    raise typer.Exit(EXIT_FAILED if failed else 0)


def _table(title: str, columns: tuple[str, ...], rows: list[tuple], left: tuple[str, ...] = ("class", "concept")):
    from rich.table import Table

    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right")
    for r in rows:
        t.add_row(*r)
    return t


# ------------------------------------------------------------------ regions

def _numbers(text: str, n: int, flag: str, form: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise typer.BadParameter(f"{flag} must be {form} in pixels, got {text!r}")
    return values


def _region(client, roi: Optional[Path], box: Optional[str], points: Optional[List[str]], radius: float,
            required: bool):
    """The ``Region`` message of exactly one of --roi, --box, --point (None when none is given)."""
    given = [x for x in (roi, box, points or None) if x is not None]
    if len(given) > 1:
        raise typer.BadParameter("give only one of --roi, --box, --point")
    if roi is not None:
        return client.region(mask_png=roi.read_bytes())
    if box is not None:
        return client.region(box=_numbers(box, 4, "--box", "x0,y0,x1,y1"))
    if points:
        return client.region(points=[_numbers(p, 2, "--point", "x,y") for p in points], radius=radius)
    if required:
        raise typer.BadParameter("this command needs a region: --roi, --box or --point")
    return None


def _check_region_options(box: Optional[str], points: Optional[List[str]]) -> None:
    """Usage errors of the region options, before any gateway is started."""
    if box is not None:
        _numbers(box, 4, "--box", "x0,y0,x1,y1")
    for p in points or []:
        _numbers(p, 2, "--point", "x,y")


def _region_mask(region, size: tuple[int, int], default_radius: float):
    """The region as the gateway draws it (``salf.contract``): bool ``[h, w]``, or None if it does not fit."""
    from salf.contract import ContractError
    from salf.contract.images import decode_mask
    from salf.contract.regions import box_mask, points_mask

    if region is None:
        return None
    try:
        kind = region.WhichOneof("kind")
        if kind == "mask_png":
            return decode_mask(region.mask_png, size)
        if kind == "box":
            b = region.box
            return box_mask((b.x0, b.y0, b.x1, b.y1), size)
        pts = region.points
        return points_mask([(p.x, p.y) for p in pts.points], pts.radius or default_radius, size)
    except ContractError:
        return None


# ------------------------------------------------------------------ commands

def predict(images: Images, top_k: TopK = 0, url: Url = None, model_repository: Repo = DEFAULT_REPO,
            timeout: Timeout = DEFAULT_TIMEOUT, token: Token = None, ca_cert: CaCert = None,
            as_json: Json = False, in_flight: InFlight = 8, output: Output = None, resume: Resume = False) -> None:
    """Top-k classes with probabilities for each image (JSON: PredictResponse). Folders are walked:
    offline scoring streams one JSON Lines row per image (--output FILE, --resume after a stop)."""
    images = _resumable(expand_inputs(images), output, resume, in_flight)

    def table(console, row):
        console.print(_table(row["image"], ("rank", "class", "probability", "logit"),
                             [(str(n), c["name"], f"{c['probability']:.4f}", f"{c['logit']:+.3f}")
                              for n, c in enumerate(row["classes"], 1)]))

    _run((url, model_repository, timeout, token, ca_cert), as_json, table, lambda client: _stream_rows(
        client, images, "predict", lambda data: client.pb.PredictRequest(image=data, top_k=top_k),
        lambda item, data, r: message_dict(r), in_flight), output)


def explain(images: Images, roi: Roi = None, box: Box = None, point: Points = None, radius: Radius = 0.0,
            class_name: Optional[str] = typer.Option(None, "--class", help="Explain this class, not the predicted one."),
            top_k: TopK = 0,
            out: Optional[Path] = typer.Option(None, "--out", "-o", file_okay=False,
                                               help="Write one figure per image here: the image, the top-k heatmaps "
                                                    "titled with concept and contribution, a colour bar, the region."),
            scale: str = typer.Option("common", "--scale", help="Heatmap colours: common (one range for every "
                                                                "map: strengths compare) or per-map."),
            save_npz: bool = typer.Option(False, "--save-npz", help="With --out: also <name>.npz with the grid maps "
                                                                    "and contributions as arrays."),
            force: bool = typer.Option(False, "--force", help="Overwrite files already in --out."),
            concept: Optional[List[str]] = typer.Option(None, "--concept", help="Also return this concept's map "
                                                        "(repeatable); for a video, write <name>.<concept>.mp4 "
                                                        "with its heatmap tracked over the frames."),
            every: int = typer.Option(1, "--every", help="Video: explain every N-th frame."),
            max_frames: Optional[int] = typer.Option(None, "--max-frames", help="Video: at most this many frames."),
            url: Url = None, model_repository: Repo = DEFAULT_REPO, timeout: Timeout = DEFAULT_TIMEOUT,
            token: Token = None, ca_cert: CaCert = None, as_json: Json = False, in_flight: InFlight = 8,
            output: Output = None, resume: Resume = False) -> None:
    """Top-k concepts by contribution S = W(class, m) * c*(m) with their concept maps; a region adds Explain
    Anything.

    JSON: ExplainResponse (each concept with its grid_map, row-major, and "geometry" saying how a grid cell
    maps to pixels), with a region "region" (ExplainRegionResponse plus "area"), with --out "figure" (and
    "npz"). Output names are the images' file names, or their paths relative to their common folder when
    two names collide; nothing is overwritten without --force.

    Videos (.mp4, .mov, .avi, .mkv, .webm, ...; PyAV) are explained frame by frame: one JSON record per
    frame ("frame", "time_s", the prediction, the top concepts and the --concept ones with their grid
    maps), frames sent to the gateway a few at a time; with --out and --concept, an annotated video per
    concept (its heatmap on one colour scale over the whole video).
    """
    from salf.figures import SCALES
    from .video import VIDEO_SUFFIXES, is_video

    images = _resumable(expand_inputs(images, IMAGE_SUFFIXES + VIDEO_SUFFIXES), output, resume, in_flight)
    _check_region_options(box, point)
    if scale not in SCALES:
        raise typer.BadParameter(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if save_npz and out is None:
        raise typer.BadParameter("--save-npz needs --out DIR")
    if every < 1 or (max_frames is not None and max_frames < 1):
        raise typer.BadParameter("--every and --max-frames must be >= 1")
    tracked = list(concept or [])
    videos = [p for p in images if is_video(p)]
    if videos and tracked and out is None:
        raise typer.BadParameter("--concept on a video writes an annotated video: give --out DIR")
    names = output_names(images)
    if out is not None:
        stills = {p: n for p, n in names.items() if p not in videos}
        claim_outputs(out, stills, (".png", ".npz") if save_npz else (".png",), force)
        claim_outputs(out, {p: n for p, n in names.items() if p in videos},
                      tuple(f".{_slug(c)}.mp4" for c in tracked), force)

    def table(console, row):
        t = row["target"]
        console.print(_table(f"{row['image']}: {t['name']} (p={t['probability']:.3f})",
                             ("rank", "concept", "contribution", "weight", "score"),
                             [(str(n), c["name"], f"{c['contribution']:+.4f}", f"{c['weight']:+.4f}",
                               f"{c['score']:+.3f}") for n, c in enumerate(row["concepts"], 1)]))
        if row.get("note"):
            console.print(row["note"])
        if "region" in row:
            console.print(_region_table(f"region of {row['region']['area']} px: concepts by activation",
                                        row["region"]["concepts"]))
        for key in ("figure", "npz"):
            if key in row:
                console.print(f"wrote {row[key]}")

    def produce(client):
        region = _region(client, roi, box, point, radius, required=False)
        stills = [p for p in images if p not in videos]
        yield from _stream_rows(
            client, stills, "explain",
            lambda data: client.explain_request(data, class_name=class_name, top_k=top_k, heatmaps="none",
                                                concepts=tracked),
            lambda image, data, r: _explain_row(client, image, data, r, region, top_k, out, names[image], scale,
                                                save_npz), in_flight)
        for video in videos:
            yield from _explain_video(client, video, class_name, top_k, tracked, out, names[video], every,
                                      max_frames)

    _run((url, model_repository, timeout, token, ca_cert), as_json, table, produce, output)


def output_names(images: list[Path]) -> dict[Path, str]:
    """A distinct output name per input: its file stem, or, when two stems collide, its path relative to
    the inputs' common folder with separators as ``__`` (``a/x.png``, ``b/x.png`` -> ``a__x``, ``b__x``)."""
    import os

    stems = [p.stem for p in images]
    if len(set(stems)) == len(stems):
        return {p: p.stem for p in images}
    resolved = [p.resolve() for p in images]
    common = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    names: dict[Path, str] = {}
    used: set[str] = set()
    for p, r in zip(images, resolved):
        name = "__".join(r.relative_to(common).with_suffix("").parts)
        if name in used:  # a.png and a.jpg in one folder, or one file given twice
            name = "__".join(r.relative_to(common).parts).replace(".", "_")
        base, k = name, 2
        while name in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name)
        names[p] = name
    return names


def claim_outputs(out: Path, names: dict[Path, str], suffixes: tuple[str, ...], force: bool) -> None:
    """Refuse (exit 2, before any request) when an output file already exists, unless ``force``."""
    existing = [out / f"{name}{suffix}" for name in names.values() for suffix in suffixes
                if (out / f"{name}{suffix}").exists()]
    if existing and not force:
        shown = ", ".join(str(p) for p in existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise CliError(f"{shown} already exist(s): pass --force to overwrite, or choose another --out", EXIT_USAGE)
    out.mkdir(parents=True, exist_ok=True)


def _region_table(title: str, activations: list[dict]):
    return _table(title, ("rank", "concept", "activation", "mean"),
                  [(str(n), a["name"], f"{a['activation']:+.3f}", f"{a['mean_activation']:+.4f}")
                   for n, a in enumerate(activations, 1)])


GEOMETRY_RULE = ("bilinear, align_corners=False: grid cell (i, j) is centred at image pixel "
                 "((i + 0.5) * image_height / grid_height, (j + 0.5) * image_width / grid_width)")


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "concept"


def _explain_video(client, video: Path, class_name, top_k, tracked: list[str], out: Optional[Path], name: str,
                   every: int, max_frames: Optional[int]):
    """One row per explained frame (frames in flight a few at a time), then the annotated videos."""
    import io
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from salf import figures as figure
    from . import video as vid

    def explain_frame(rgb):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        return client.explain(buf.getvalue(), class_name=class_name, top_k=top_k, heatmaps="none", concepts=tracked)

    try:
        frames = vid.read_frames(video, every, max_frames)
        fps = vid.frame_rate(video) / every
    except (OSError, ValueError) as exc:  # PyAV's errors are OSError subclasses
        raise CliError(f"cannot read the video {video}: {exc}", EXIT_FAILED) from exc
    small: list[np.ndarray] = []
    maps: dict[str, list[np.ndarray]] = {c: [] for c in tracked}
    window: deque = deque()
    bar = tqdm(desc=f"explain {video.name}", unit="frame", file=sys.stderr, leave=False)

    def finished(item):
        index, t, rgb, future = item
        key = f"{video}#{index}"
        try:
            r = future.result()
        except grpc.RpcError as exc:
            return _error_row(key, exc)
        bar.update(1)
        row = {"image": key, "video": str(video), "frame": index, "time_s": round(t, 4), **message_dict(r)}
        grid = (r.grid_height, r.grid_width)
        row["geometry"] = {"grid": list(grid), "image_size": [r.image_height, r.image_width],
                           "upsampling": GEOMETRY_RULE}
        if out is not None and tracked:
            dh, dw = figure.display_size(rgb.shape[:2])
            small.append(np.asarray(Image.fromarray(rgb).resize((dw, dh), Image.BILINEAR)))
            for c in r.requested:
                maps[c.name].append(np.asarray(c.grid_map, np.float32).reshape(grid))
        return row

    with ThreadPoolExecutor(max_workers=4) as pool:
        for index, t, rgb in frames:
            window.append((index, t, rgb, pool.submit(explain_frame, rgb)))
            if len(window) >= 8:
                yield finished(window.popleft())
        while window:
            yield finished(window.popleft())
    bar.close()
    if out is not None and tracked and small:
        for c in tracked:
            lo_hi = figure.value_range(maps[c]) if maps[c] else (0.0, 1.0)
            annotated = [figure.overlay_frame(f, m, lo_hi, f"{c}   frame {k * every}") for k, (f, m)
                         in enumerate(zip(small, maps[c]))]
            if annotated:
                path = vid.write_video(out / f"{name}.{_slug(c)}.mp4", annotated, fps)
                typer.echo(f"wrote {path}", err=True)


def _explain_row(client, image: Path, data: bytes, r, region, top_k, out: Optional[Path], name: str,
                 scale: str = "common", save_npz: bool = False) -> dict:
    """The row of one answered Explain ``r`` of ``image`` (its bytes ``data``): the response, its grid
    geometry, the region's concepts (by explanation id), the figure and arrays with ``out``."""
    import numpy as np

    from salf.contract.images import load_rgb

    from salf import figures as figure

    row = message_dict(r)
    grid = (r.grid_height, r.grid_width)
    row["geometry"] = {"grid": list(grid), "image_size": [r.image_height, r.image_width], "upsampling": GEOMETRY_RULE}
    asked = top_k or min(5, len(client.info.concepts))
    if len(r.concepts) < asked:
        row["note"] = (f"{len(r.concepts)} of the {asked} concepts asked for: only {r.concepts_available} concepts "
                       f"have a non-zero weight for {r.target.name!r}")
    if region is not None:
        rr = message_dict(_region_by_id(client, region, r.explanation_id, data, top_k))
        row["region"] = {**rr, "area": rr["region_area"]}
    if out is not None:
        rgb = load_rgb(data)
        mask = _region_mask(region, rgb.shape[:2], client.info.radius)
        panels = [figure.Panel(c.name, c.contribution, np.asarray(c.grid_map, np.float32).reshape(grid))
                  for c in r.concepts]
        title = f"{image.name}: {r.target.name} (p={r.target.probability:.3f}), top {len(panels)} concepts by contribution"
        row["figure"] = str(out / f"{name}.png")
        figure.compose(rgb, panels, title, mask, scale).save(row["figure"])
        if save_npz:
            row["npz"] = str(out / f"{name}.npz")
            np.savez(row["npz"], grid_maps=np.stack([p.grid_map for p in panels]) if panels else np.zeros((0, *grid)),
                     concept_index=np.array([c.index for c in r.concepts], np.int64),
                     concept_name=np.array([c.name for c in r.concepts]),
                     contribution=np.array([c.contribution for c in r.concepts], np.float32),
                     image_size=np.array([r.image_height, r.image_width]), target=np.array(r.target.index))
    return row


def _region_by_id(client, region, explanation_id: str, data: bytes, top_k: int):
    """ExplainRegion on the cached maps; resend the image only if the id expired meanwhile."""
    from .client import by_explanation_id

    return by_explanation_id(lambda eid, image: client.explain_region(region, explanation_id=eid, image=image,
                                                                      top_k=top_k), explanation_id, data)


def explain_region(images: Images, roi: Roi = None, box: Box = None, point: Points = None, radius: Radius = 0.0,
                   top_k: TopK = 0, url: Url = None, model_repository: Repo = DEFAULT_REPO,
                   timeout: Timeout = DEFAULT_TIMEOUT, token: Token = None, ca_cert: CaCert = None,
                   as_json: Json = False) -> None:
    """Explain Anything: top concepts by aggregated activation inside a mask, box or points
    (JSON: ExplainRegionResponse plus "area")."""
    images = expand_inputs(images)
    _check_region_options(box, point)
    if roi is None and box is None and not point:
        raise typer.BadParameter("explain-region needs a region: --roi, --box or --point")

    def table(console, row):
        console.print(_region_table(f"{row['image']}: region of {row['area']} px, concepts by activation",
                                    row["concepts"]))

    def one(client, region, image):
        doc = message_dict(client.explain_region(region, image=image.read_bytes(), top_k=top_k))
        return {**doc, "area": doc["region_area"]}

    def produce(client):
        region = _region(client, roi, box, point, radius, required=True)
        return _rows(client, images, "explain-region", lambda c, image: one(c, region, image))

    _run((url, model_repository, timeout, token, ca_cert), as_json, table, produce)


def intervene(images: Images, roi: Roi = None, box: Box = None, point: Points = None, radius: Radius = 0.0,
              concept: str = typer.Option(..., "--concept", help="Concept name (or index) to edit."),
              beta: float = typer.Option(..., "--beta", help="c[m] += beta * I in the region; positive or negative."),
              top_k: TopK = 0, url: Url = None, model_repository: Repo = DEFAULT_REPO,
              timeout: Timeout = DEFAULT_TIMEOUT, token: Token = None, ca_cert: CaCert = None,
              as_json: Json = False) -> None:
    """Local intervention: edit one concept's map in a region, re-run the head, show the change
    (JSON: InterveneResponse, with "logit_deltas" keyed by class name, plus "concept" and "beta")."""
    images = expand_inputs(images)
    _check_region_options(box, point)
    if roi is None and box is None and not point:
        raise typer.BadParameter("intervene needs a region: --roi, --box or --point")

    def table(console, row):
        b, a = row["predicted_before"], row["predicted_after"]
        console.print(_table(f"{row['image']}: {row['concept']} += {row['beta']:g} in the region: "
                             f"{b['name']} ({b['probability']:.3f}) -> {a['name']} ({a['probability']:.3f})",
                             ("class", "logit before", "logit after", "delta"),
                             [(name, f"{lb:+.4f}", f"{la:+.4f}", f"{d:+.4f}") for (name, d), lb, la in
                              zip(row["logit_deltas"].items(), row["logits_before"], row["logits_after"])]))
        if row.get("note"):
            console.print(row["note"])
        console.print(_table("edited region: concepts by activation", ("rank", "concept", "activation"),
                             [(str(n), c["name"], f"{c['activation']:+.3f}")
                              for n, c in enumerate(row["region_concepts"], 1)]))

    def produce(client):
        region = _region(client, roi, box, point, radius, required=True)
        names = client.info.concepts
        target = concept if concept in names or not concept.isdigit() else int(concept)
        name = names[target] if isinstance(target, int) and target < len(names) else concept
        edit = client.edit(region, beta, target)

        def one(c, image):
            doc = message_dict(c.intervene([edit], image=image.read_bytes(), top_k=top_k))
            row = {**doc, "concept": name, "beta": beta, "logit_deltas": dict(zip(c.info.classes, doc["logit_deltas"]))}
            if top_k > len(c.info.classes):
                row["note"] = f"the model has {len(c.info.classes)} classes: before/after list all of them"
            return row
        return _rows(client, images, "intervene", one)

    _run((url, model_repository, timeout, token, ca_cert), as_json, table, produce)


def rules(class_name: Optional[str] = typer.Option(None, "--class", help="Only this class."),
          plot: Optional[Path] = typer.Option(None, "--plot", dir_okay=False,
                                              help="Also draw the rules to this PNG: concepts -> classes, width by "
                                                   "|weight|, green positive, red negative (paper Fig. 3)."),
          max_classes: int = typer.Option(20, "--max-classes", help="Classes drawn by --plot."),
          force: bool = typer.Option(False, "--force", help="Overwrite --plot's file."),
          url: Url = None, model_repository: Repo = DEFAULT_REPO, timeout: Timeout = DEFAULT_TIMEOUT,
          token: Token = None, ca_cert: CaCert = None, as_json: Json = False) -> None:
    """Global decision rules: each class's non-zero concept weights, largest |weight| first
    (JSON: one ClassRule per line, plus "class", its name)."""
    import grpc

    if plot is not None and plot.exists() and not force:
        raise CliError(f"{plot} already exists: pass --force to overwrite it", EXIT_USAGE)

    def table(console, row):
        console.print(_table(f"{row['class']} (bias {row['bias']:+.4f}, {len(row['terms'])} concepts)",
                             ("concept", "weight"), [(t["concept_name"], f"{t['weight']:+.4f}") for t in row["terms"]]))

    def produce(client):
        try:
            response = client.class_rules(class_name or "")
        except grpc.RpcError as exc:
            raise CliError(f"{exc.code().name}: {exc.details()}", EXIT_FAILED) from exc
        rows = [{"class": rule.class_name, **message_dict(rule)} for rule in response.rules]
        if plot is not None:
            from salf.figures import rules_figure

            plot.parent.mkdir(parents=True, exist_ok=True)
            shown = min(len(rows), max_classes)
            rules_figure([(r["class"], [(t["concept_name"], t["weight"]) for t in r["terms"]]) for r in rows],
                         f"decision rules: {shown} of {len(rows)} classes", max_classes).save(plot)
            typer.echo(f"wrote {plot}", err=True)
        return rows

    _run((url, model_repository, timeout, token, ca_cert), as_json, table, produce)


def info(url: Url = None, model_repository: Repo = DEFAULT_REPO, timeout: Timeout = DEFAULT_TIMEOUT,
         token: Token = None, ca_cert: CaCert = None, as_json: Json = False) -> None:
    """The served model: concepts, classes, grid, input size, backend (JSON: ModelInfo plus "grid" and
    "input_size" as [height, width])."""
    def table(console, row):
        from rich.table import Table

        t = Table(title="model", show_header=False)
        for key, value in row.items():
            t.add_row(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
        console.print(t)

    def produce(client):
        i = client.info
        return [{**message_dict(i), "input_size": [i.input_height, i.input_width],
                 "grid": [i.grid_height, i.grid_width]}]

    _run((url, model_repository, timeout, token, ca_cert), as_json, table, produce)


def monitor(gateway: Optional[str] = typer.Option("http://127.0.0.1:9464/metrics", "--gateway",
                                              help="The gateway's metrics URL ('' to leave it out)."),
            triton: Optional[str] = typer.Option(None, "--triton",
                                                 help="Triton's metrics URL, e.g. http://127.0.0.1:8002/metrics."),
            interval: float = typer.Option(2.0, "--interval", help="Seconds between refreshes (and between the two "
                                                                   "scrapes of --once)."),
            once: bool = typer.Option(False, "--once", help="One snapshot (two scrapes --interval apart), then exit."),
            as_json: Json = False) -> None:
    """Live view of the gateway's and Triton's metrics: requests/s, p50/p99 per RPC, errors by code, cache
    hit rate, and per Triton model requests/s, average executed batch size, queue and compute time."""
    import json as _json

    from rich.console import Console
    from rich.live import Live

    from . import monitor as mon

    if interval <= 0:
        raise typer.BadParameter("--interval must be > 0")
    urls = {"gateway": gateway or None, "triton": triton or None}
    if not any(urls.values()):
        raise typer.BadParameter("give --gateway and/or --triton")

    def scrape() -> dict:
        return {k: mon.fetch(u) for k, u in urls.items() if u}

    def snap(prev, cur) -> dict:
        return mon.snapshot(*((prev.get(k), cur[k]) if k in cur else None for k in ("gateway", "triton")))

    prev = scrape()
    if once:
        time.sleep(interval)
        doc = snap(prev, scrape())
        if as_json:
            print(_json.dumps(doc), flush=True)
        else:
            Console().print(mon.render(doc))
        raise typer.Exit(0 if all(section["up"] for section in doc.values()) else EXIT_UNREACHABLE)
    with Live(mon.render({}), refresh_per_second=4, console=Console()) as live:
        try:
            while True:
                time.sleep(interval)
                cur = scrape()
                live.update(mon.render(snap(prev, cur)))
                prev = cur
        except KeyboardInterrupt:
            pass


def register(app: typer.Typer) -> None:
    """Add this part's commands to the top-level `salfctl` app."""
    for name, fn in zip(COMMANDS, (predict, explain, explain_region, intervene, rules, info, monitor)):
        command(app, name)(fn)
