"""`salfctl intervene`: edit one concept's map in a region, re-run the head, show the change."""
from __future__ import annotations

import typer

from salf.cli import DEFAULT_REPO, DEFAULT_TIMEOUT, CaCert, Json, Repo, Timeout, Token, TopK, Url

from .inputs import Images, expand_inputs
from .regions import Box, Points, Radius, Roi, check_region_options, parse_region
from .rows import message_dict, request_rows, rich_table, run


def intervene(images: Images, roi: Roi = None, box: Box = None, point: Points = None, radius: Radius = 0.0,
              concept: str = typer.Option(..., "--concept", help="Concept name (or index) to edit."),
              beta: float = typer.Option(..., "--beta", help="c[m] += beta * I in the region; positive or negative."),
              top_k: TopK = 0, url: Url = None, model_repository: Repo = DEFAULT_REPO,
              timeout: Timeout = DEFAULT_TIMEOUT, token: Token = None, ca_cert: CaCert = None,
              as_json: Json = False) -> None:
    """Local intervention: edit one concept's map in a region, re-run the head, show the change
    (JSON: InterveneResponse, with "logit_deltas" keyed by class name, plus "concept" and "beta")."""
    images = expand_inputs(images)
    check_region_options(box, point)
    if roi is None and box is None and not point:
        raise typer.BadParameter("intervene needs a region: --roi, --box or --point")

    def table(console, row):
        b, a = row["predicted_before"], row["predicted_after"]
        console.print(rich_table(f"{row['image']}: {row['concept']} += {row['beta']:g} in the region: "
                                 f"{b['name']} ({b['probability']:.3f}) -> {a['name']} ({a['probability']:.3f})",
                                 ("class", "logit before", "logit after", "delta"),
                                 [(name, f"{lb:+.4f}", f"{la:+.4f}", f"{d:+.4f}") for (name, d), lb, la in
                                  zip(row["logit_deltas"].items(), row["logits_before"], row["logits_after"])]))
        if row.get("note"):
            console.print(row["note"])
        console.print(rich_table("edited region: concepts by activation", ("rank", "concept", "activation"),
                                 [(str(n), c["name"], f"{c['activation']:+.3f}")
                                  for n, c in enumerate(row["region_concepts"], 1)]))

    def produce(client):
        region = parse_region(client, roi, box, point, radius, required=True)
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
        return request_rows(client, images, "intervene", one)

    run((url, model_repository, timeout, token, ca_cert), as_json, table, produce)
