"""What the explorer page can ask for, as plain Python: images the page opened, and the gateway
requests made on their behalf, answered as JSON-ready dicts (``message_dict`` of the response, as
`salfctl ... --json` prints it, plus a few fields the page needs).

The page never talks to the gateway itself: this object holds the one :class:`SalfClient` (and its
token), so the token never reaches the browser. Images are decoded here with the contract's decoder
(EXIF turned, 16-bit scaled, first frame) and handed back to the page as PNG at the image's own size:
the page draws exactly the pixels the gateway explains, so a region drawn on it means the same pixels
to both.

Explanations are referred to by the gateway's ``explanation_id``; when the gateway no longer holds
one (expired, evicted, restarted), the request is repeated once with the image, as
``salfctl explain --roi`` does.
"""
from __future__ import annotations

import base64
import io
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from salf.contract import ContractError
from salf.contract.files import sha256_bytes
from salf.contract.images import decode_image, decode_mask, encode_png
from salf.contract.regions import box_mask, default_radius, points_mask

from ..client import by_explanation_id
from ..commands.inputs import folder_files
from ..commands.rows import GEOMETRY_RULE, message_dict

MAX_IMAGES = 64          # images the page opened that stay addressable (least recently used dropped)
MAX_FOLDER = 5000        # images listed from --images DIR
MAX_PIXELS = 40_000_000  # the gateway's default cap: larger files are refused before decoding
THUMB = 96               # longer side of folder and gallery thumbnails, pixels


class UserError(ValueError):
    """A request the page made that cannot be served as asked (HTTP 400, message shown on the page)."""


class UnknownImage(UserError):
    """An image key this explorer does not hold (opened too long ago, or before a restart)."""


@dataclass
class OpenImage:
    key: str
    name: str
    data: bytes          # the encoded bytes, as the gateway receives them
    rgb: np.ndarray      # uint8 [h, w, 3], upright, at the image's own size
    png: bytes           # ``rgb`` as PNG: what the page draws

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]


def rpc_error(exc: grpc.RpcError) -> tuple[str, str]:
    """``(code name, readable message)`` of a failed gateway call."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    name = code.name if code is not None else "UNKNOWN"
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        details = f"the gateway is unreachable or not answering ({details}); the page keeps working when it is back"
    return name, details


def list_folder(folder: Path | None) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted by path; at most :data:`MAX_FOLDER`)."""
    if folder is None:
        return []
    return folder_files(folder)[:MAX_FOLDER]


def thumbnail_png(rgb: np.ndarray, longest: int = THUMB) -> bytes:
    h, w = rgb.shape[:2]
    f = longest / max(h, w)
    img = Image.fromarray(rgb).resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Explorer:
    """The explorer's state (open images, folder, gallery scores) and its gateway calls."""

    def __init__(self, client, folder: Path | None = None, reconnect_wait: float = 3.0) -> None:
        self.client = client
        client.reconnect_wait = reconnect_wait  # a restarted gateway answers the next click, not the one after
        self.folder = folder
        self.files = list_folder(folder)
        self._images: OrderedDict[str, OpenImage] = OrderedDict()
        self._lock = threading.Lock()
        self._gallery_lock = threading.Lock()
        self._scores: dict[int, np.ndarray] = {}  # folder index -> c* of every concept
        self._score_version: int | None = None

    # ---------------------------------------------------------- model

    def info(self) -> dict:
        """The served model (re-read on every page load: a new export is picked up) and the folder."""
        i = self.client.model_info()
        self.client.info = i
        return {"model": {**message_dict(i), "grid": [i.grid_height, i.grid_width],
                          "input_size": [i.input_height, i.input_width]},
                "gateway": "in-process" if self.client.in_process else self.client.url,
                "folder": str(self.folder) if self.folder else None,
                "files": [str(p.relative_to(self.folder)) for p in self.files] if self.folder else []}

    # ---------------------------------------------------------- images

    def open_image(self, data: bytes, name: str) -> dict:
        """Decode ``data`` as the gateway will, keep it, and describe it to the page."""
        if not data:
            raise UserError("the image is empty")
        try:
            rgb = decode_image(data, None, max_pixels=MAX_PIXELS).model_input
        except ContractError as exc:
            raise UserError(f"{name}: {exc}") from exc
        key = sha256_bytes(data)[:16]
        img = OpenImage(key, name, data, rgb, encode_png(rgb))
        with self._lock:
            self._images[key] = img
            self._images.move_to_end(key)
            while len(self._images) > MAX_IMAGES:
                self._images.popitem(last=False)
        return self.describe(img)

    def describe(self, img: OpenImage) -> dict:
        i = self.client.info
        h, w = img.size
        return {"key": img.key, "name": img.name, "width": w, "height": h,
                "point_radius": default_radius((h, w), (i.input_height, i.input_width),
                                               (i.grid_height, i.grid_width), i.radius)}

    def open_folder_image(self, index: int) -> dict:
        path = self._folder_file(index)
        return self.open_image(path.read_bytes(), str(path.relative_to(self.folder)))

    def _folder_file(self, index: int) -> Path:
        if not 0 <= index < len(self.files):
            raise UserError(f"no folder image {index}: the folder has {len(self.files)} images")
        return self.files[index]

    def folder_thumbnail(self, index: int) -> bytes:
        try:
            rgb = decode_image(self._folder_file(index).read_bytes(), None, max_pixels=MAX_PIXELS).model_input
        except ContractError as exc:
            raise UserError(str(exc)) from exc
        return thumbnail_png(rgb)

    def image(self, key: str) -> OpenImage:
        with self._lock:
            img = self._images.get(key)
            if img is None:
                raise UnknownImage(f"image {key!r} is no longer open here: open it again")
            self._images.move_to_end(key)
            return img

    # ---------------------------------------------------------- regions

    def region(self, img: OpenImage, spec: dict):
        """``{"box": [x0, y0, x1, y1]}``, ``{"points": [[x, y], ...], "radius": r}`` or
        ``{"mask_png": base64}`` -> ``(salf.v1.Region, bool mask [h, w])``. Coordinates are pixels of the
        image's own size (the page maps its display to them)."""
        if not isinstance(spec, dict):
            raise UserError("region must be an object with one of box, points, mask_png")
        kinds = [k for k in ("box", "points", "mask_png") if k in spec]
        if len(kinds) != 1:
            raise UserError("region must have exactly one of box, points, mask_png")
        try:
            if kinds == ["box"]:
                box = [float(v) for v in spec["box"]]
                if len(box) != 4:
                    raise UserError("box must be [x0, y0, x1, y1]")
                return self.client.region(box=box), box_mask(tuple(box), img.size)
            if kinds == ["points"]:
                pts = [(float(x), float(y)) for x, y in spec["points"]]
                radius = float(spec.get("radius") or self.describe(img)["point_radius"])
                return self.client.region(points=pts, radius=radius), points_mask(pts, radius, img.size)
            png = base64.b64decode(spec["mask_png"], validate=True)
            return self.client.region(mask_png=png), decode_mask(png, img.size)
        except (TypeError, ValueError) as exc:  # ContractError is a ValueError
            raise UserError(f"bad region: {exc}") from exc

    # ---------------------------------------------------------- gateway calls

    def explain(self, key: str, class_name: str | None = None, top_k: int = 0) -> dict:
        img = self.image(key)
        r = self.client.explain(img.data, class_name=class_name or None, top_k=top_k, heatmaps="none")
        doc = message_dict(r)
        doc["geometry"] = {"grid": [r.grid_height, r.grid_width], "image_size": [r.image_height, r.image_width],
                           "upsampling": GEOMETRY_RULE}
        return doc

    def explain_region(self, key: str, explanation_id: str, region: dict, top_k: int = 0) -> dict:
        img = self.image(key)
        pb_region, mask = self.region(img, region)
        r = by_explanation_id(lambda eid, data: self.client.explain_region(
            pb_region, explanation_id=eid, image=data, top_k=top_k), explanation_id, img.data)
        return {**message_dict(r), "area": int(mask.sum())}

    def intervene(self, key: str, explanation_id: str, region: dict, edits: list, top_k: int = 0) -> dict:
        """``edits``: ``[{"concept": name, "beta": float}, ...]``, all inside ``region``."""
        img = self.image(key)
        pb_region, _ = self.region(img, region)
        if not isinstance(edits, list) or not edits:
            raise UserError("pick at least one concept to edit")
        try:
            pb_edits = [self.client.edit(pb_region, float(e["beta"]), str(e["concept"])) for e in edits]
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"each edit needs a concept and a beta: {exc}") from exc
        r = by_explanation_id(lambda eid, data: self.client.intervene(
            pb_edits, explanation_id=eid, image=data, top_k=top_k), explanation_id, img.data)
        doc = message_dict(r)
        doc["logit_deltas"] = dict(zip(self.client.info.classes, doc["logit_deltas"]))
        doc["edits"] = [{"concept": str(e["concept"]), "beta": float(e["beta"])} for e in edits]
        return doc

    def rules(self, class_name: str) -> dict:
        r = self.client.class_rules(class_name)
        return message_dict(r.rules[0]) if r.rules else {"class_name": class_name, "terms": []}

    # ---------------------------------------------------------- gallery

    def gallery(self, concept: str, k: int = 8) -> dict:
        """The folder's ``k`` images with the highest global activation c* of ``concept`` (paper 4.3).
        The first call scores every folder image (one Predict with concept scores each, 4 in flight, all
        concepts' c* kept; no explanation is cached for them), later calls sort the kept scores; a new model version scores again."""
        names = list(self.client.info.concepts)
        if concept not in names:
            raise UserError(f"unknown concept {concept!r}")
        if not self.files:
            raise UserError("no image folder: start `salfctl ui --images DIR` to get a gallery")
        m = names.index(concept)
        scores = self._folder_scores(names)
        order = sorted(scores, key=lambda i: -scores[i][m])[:max(1, k)]
        return {"concept": concept, "scored": len(scores), "total": len(self.files),
                "images": [{"index": i, "name": str(self.files[i].relative_to(self.folder)),
                            "score": float(scores[i][m])} for i in order]}

    def _folder_scores(self, names: list[str]) -> dict[int, np.ndarray]:
        with self._gallery_lock:  # one scoring pass at a time; a second request waits and reuses it
            version = self.client.info.model_version
            if self._score_version != version:
                self._scores, self._score_version = {}, version
            todo = [i for i in range(len(self.files)) if i not in self._scores]

            def score(i: int):
                # Predict: no concept maps from Triton, nothing put in the gateway's explanation cache
                r = self.client.predict(self.files[i].read_bytes(), top_k=1, concept_scores=True)
                return i, np.asarray(r.concept_scores, np.float32)

            with ThreadPoolExecutor(max_workers=4) as pool:
                for fut in [pool.submit(score, i) for i in todo]:
                    try:
                        i, s = fut.result()
                    except grpc.RpcError as exc:
                        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                            continue  # an unreadable file in the folder: left out of the gallery
                        raise
                    self._scores[i] = s
            return dict(self._scores)

    # ---------------------------------------------------------- downloads

    def figure(self, key: str, class_name: str | None, concepts: list[str], region: dict | None,
               scale: str = "common") -> bytes:
        """The composed figure (salf/figures.py, as `salfctl explain --out` draws it) of the shown
        concepts for the explained class, with the region outlined."""
        from salf import figures as figure

        img = self.image(key)
        mask = self.region(img, region)[1] if region else None
        if scale not in figure.SCALES:
            raise UserError(f"scale must be one of {figure.SCALES}")
        r = self.client.explain(img.data, class_name=class_name or None, heatmaps="none", concepts=list(concepts))
        grid = (r.grid_height, r.grid_width)
        panels = [figure.Panel(c.name, c.contribution, np.asarray(c.grid_map, np.float32).reshape(grid))
                  for c in r.requested]
        title = (f"{img.name}: {r.target.name} (p={r.target.probability:.3f}), "
                 f"{len(panels)} concept{'s' if len(panels) != 1 else ''}")
        buf = io.BytesIO()
        figure.compose(img.rgb, panels, title, mask, scale).save(buf, format="PNG")
        return buf.getvalue()
