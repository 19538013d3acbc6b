"""The region options of explain, explain-region and intervene (``--roi``, ``--box``, ``--point``,
``--radius``): their usage checks, the ``Region`` message they make, and the mask the gateway draws
from it (for figures)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from .rows import rich_table

Roi = Annotated[Optional[Path], typer.Option("--roi", exists=True, dir_okay=False,
                                             help="Region mask (PNG at the image's size; docs: gateway.proto Region).")]
Box = Annotated[Optional[str], typer.Option("--box", help="Region as a box x0,y0,x1,y1 (pixels).")]
Points = Annotated[Optional[List[str]], typer.Option("--point", help="Region point x,y in pixels (repeatable).")]
Radius = Annotated[float, typer.Option("--radius", help="Point radius in pixels (0: the model's prompt radius).")]


def numbers(text: str, n: int, flag: str, form: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise typer.BadParameter(f"{flag} must be {form} in pixels, got {text!r}")
    return values


def parse_region(client, roi: Optional[Path], box: Optional[str], points: Optional[List[str]], radius: float,
                 required: bool):
    """The ``Region`` message of exactly one of --roi, --box, --point (None when none is given)."""
    given = [x for x in (roi, box, points or None) if x is not None]
    if len(given) > 1:
        raise typer.BadParameter("give only one of --roi, --box, --point")
    if roi is not None:
        return client.region(mask_png=roi.read_bytes())
    if box is not None:
        return client.region(box=numbers(box, 4, "--box", "x0,y0,x1,y1"))
    if points:
        return client.region(points=[numbers(p, 2, "--point", "x,y") for p in points], radius=radius)
    if required:
        raise typer.BadParameter("this command needs a region: --roi, --box or --point")
    return None


def check_region_options(box: Optional[str], points: Optional[List[str]]) -> None:
    """Usage errors of the region options, before any gateway is started."""
    if box is not None:
        numbers(box, 4, "--box", "x0,y0,x1,y1")
    for p in points or []:
        numbers(p, 2, "--point", "x,y")


def region_mask(region, size: tuple[int, int], default_radius: float):
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


def region_table(title: str, activations: list[dict]):
    return rich_table(title, ("rank", "concept", "activation", "mean"),
                      [(str(n), a["name"], f"{a['activation']:+.3f}", f"{a['mean_activation']:+.4f}")
                       for n, a in enumerate(activations, 1)])
