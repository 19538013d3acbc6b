"""`salfctl explain` (concepts by contribution with their maps; a region adds Explain Anything; videos
frame by frame, in explain_video.py) and `salfctl explain-region` (concepts inside a region)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from salf.cli import DEFAULT_REPO, DEFAULT_TIMEOUT, CaCert, Json, Repo, Timeout, Token, TopK, Url

from .explain_video import explain_video
from .inputs import IMAGE_SUFFIXES, Images, claim_outputs, expand_inputs, output_names, slug
from .regions import Box, Points, Radius, Roi, check_region_options, parse_region, region_mask, region_table
from .rows import (GEOMETRY_RULE, InFlight, Output, Resume, message_dict, request_rows, resumable, rich_table,
                   run, stream_rows)


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
    from ..video import VIDEO_SUFFIXES, is_video

    images = resumable(expand_inputs(images, IMAGE_SUFFIXES + VIDEO_SUFFIXES), output, resume, in_flight)
    check_region_options(box, point)
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
                      tuple(f".{slug(c)}.mp4" for c in tracked), force)

    def table(console, row):
        t = row["target"]
        console.print(rich_table(f"{row['image']}: {t['name']} (p={t['probability']:.3f})",
                                 ("rank", "concept", "contribution", "weight", "score"),
                                 [(str(n), c["name"], f"{c['contribution']:+.4f}", f"{c['weight']:+.4f}",
                                   f"{c['score']:+.3f}") for n, c in enumerate(row["concepts"], 1)]))
        if row.get("note"):
            console.print(row["note"])
        if "region" in row:
            console.print(region_table(f"region of {row['region']['area']} px: concepts by activation",
                                       row["region"]["concepts"]))
        for key in ("figure", "npz"):
            if key in row:
                console.print(f"wrote {row[key]}")

    def produce(client):
        region = parse_region(client, roi, box, point, radius, required=False)
        stills = [p for p in images if p not in videos]
        yield from stream_rows(
            client, stills, "explain",
            lambda data: client.explain_request(data, class_name=class_name, top_k=top_k, heatmaps="none",
                                                concepts=tracked),
            lambda image, data, r: _explain_row(client, image, data, r, region, top_k, out, names[image], scale,
                                                save_npz), in_flight)
        for video in videos:
            yield from explain_video(client, video, class_name, top_k, tracked, out, names[video], every,
                                     max_frames)

    run((url, model_repository, timeout, token, ca_cert), as_json, table, produce, output)


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
        mask = region_mask(region, rgb.shape[:2], client.info.radius)
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
    from ..client import by_explanation_id

    return by_explanation_id(lambda eid, image: client.explain_region(region, explanation_id=eid, image=image,
                                                                      top_k=top_k), explanation_id, data)


def explain_region(images: Images, roi: Roi = None, box: Box = None, point: Points = None, radius: Radius = 0.0,
                   top_k: TopK = 0, url: Url = None, model_repository: Repo = DEFAULT_REPO,
                   timeout: Timeout = DEFAULT_TIMEOUT, token: Token = None, ca_cert: CaCert = None,
                   as_json: Json = False) -> None:
    """Explain Anything: top concepts by aggregated activation inside a mask, box or points
    (JSON: ExplainRegionResponse plus "area")."""
    images = expand_inputs(images)
    check_region_options(box, point)
    if roi is None and box is None and not point:
        raise typer.BadParameter("explain-region needs a region: --roi, --box or --point")

    def table(console, row):
        console.print(region_table(f"{row['image']}: region of {row['area']} px, concepts by activation",
                                   row["concepts"]))

    def one(client, region, image):
        doc = message_dict(client.explain_region(region, image=image.read_bytes(), top_k=top_k))
        return {**doc, "area": doc["region_area"]}

    def produce(client):
        region = parse_region(client, roi, box, point, radius, required=True)
        return request_rows(client, images, "explain-region", lambda c, image: one(c, region, image))

    run((url, model_repository, timeout, token, ca_cert), as_json, table, produce)
