"""Protobuf <-> the gateway's domain values, and :class:`GatewayServicer`: protobuf in, a
:class:`~serving.service.Gateway` call, protobuf out (STYLE 8: convert at the edge). No gRPC server
code and no error handling here: serving/boundary.py runs these methods behind its error boundary.
"""
from __future__ import annotations

import numpy as np

from salf import load_api
from salf.contract.images import encode_png
from salf.contract.regions import MAX_POINTS

from . import errors
from .service import Activation, ClassScore, Contribution, Edit, Gateway, Region


def region_from_pb(region, max_points: int = MAX_POINTS) -> Region:
    kind = region.WhichOneof("kind") if region is not None else None
    if kind == "mask_png":
        return Region(mask_png=bytes(region.mask_png))
    if kind == "box":
        b = region.box
        return Region(box=(b.x0, b.y0, b.x1, b.y1))
    if kind == "points":
        # Counted before a single point is converted: a 3-million-point message is refused at once.
        n = len(region.points.points)
        if n > max_points:
            raise errors.InvalidArgument(f"points region has {n} points; at most {max_points} are accepted "
                                         f"(send a mask_png for a region drawn with many points)")
        return Region(points=tuple((p.x, p.y) for p in region.points.points), radius=region.points.radius)
    raise errors.InvalidArgument("region is missing: set region.mask_png, region.box or region.points")


def edit_from_pb(edit, max_points: int = MAX_POINTS) -> Edit:
    which = edit.WhichOneof("concept")
    if which is None:
        raise errors.InvalidArgument("edit has no concept: set concept_name or concept_index")
    return Edit(region=region_from_pb(edit.region if edit.HasField("region") else None, max_points),
                beta=float(edit.beta),
                name=edit.concept_name if which == "concept_name" else None,
                index=edit.concept_index if which == "concept_index" else None)


def class_score_pb(pb, c: ClassScore):
    return pb.ClassScore(index=c.index, name=c.name, probability=c.probability, logit=c.logit)


def activation_pb(pb, a: Activation):
    return pb.ConceptActivation(index=a.index, name=a.name, activation=a.activation, mean_activation=a.mean_activation)


def heatmap_pb(pb, heat: np.ndarray, fmt: int):
    """Heatmap ``[h, w]`` float32 -> ``Heatmap`` with a min-max normalised 8-bit PNG and/or float16."""
    lo, hi = float(heat.min()), float(heat.max())
    out = pb.Heatmap(height=heat.shape[0], width=heat.shape[1], min=lo, max=hi)
    if fmt in (pb.HEATMAP_FORMAT_UNSPECIFIED, pb.HEATMAP_FORMAT_PNG, pb.HEATMAP_FORMAT_BOTH):
        scaled = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
        out.png = encode_png(np.round(scaled * 255.0).astype(np.uint8))
    if fmt in (pb.HEATMAP_FORMAT_FLOAT16, pb.HEATMAP_FORMAT_BOTH):
        out.float16 = heat.astype("<f2").tobytes()
    return out


def contribution_pb(pb, c: Contribution, fmt: int):
    msg = pb.ConceptContribution(index=c.index, name=c.name, contribution=c.contribution, weight=c.weight,
                                 score=c.score)
    if c.heatmap is not None:
        msg.heatmap.CopyFrom(heatmap_pb(pb, c.heatmap, fmt))
    if c.grid_map is not None:
        msg.grid_map.extend(np.asarray(c.grid_map, dtype=np.float32).reshape(-1).tolist())
    return msg


class GatewayServicer:
    """``salf.v1.Gateway``: protobuf in, :class:`Gateway` call, protobuf out; each method takes the
    parsed request and the request's :class:`~serving.budget.Budget`. No error handling here:
    exceptions go to the server's error boundary."""

    def __init__(self, gateway: Gateway, max_message_bytes: int = 64 * 1024 * 1024) -> None:
        self.gateway = gateway
        self.max_message_bytes = int(max_message_bytes)
        self.pb, _ = load_api()

    def Predict(self, request, budget):
        g = self.gateway  # one version answers the whole call, even if a new one is switched in meanwhile
        r = g.predict(request.image, request.top_k, budget, concept_scores=request.concept_scores)
        return self.pb.PredictResponse(classes=[class_score_pb(self.pb, c) for c in r.classes],
                                       image_height=r.size[0], image_width=r.size[1], model_version=g.spec.version,
                                       concept_scores=[] if r.concept_scores is None else r.concept_scores.tolist())

    def Explain(self, request, budget):
        pb = self.pb
        which = request.WhichOneof("target")
        fmt = request.heatmaps
        if fmt not in pb.HeatmapFormat.values():
            raise errors.InvalidArgument(f"heatmaps format {fmt} is not one of {list(pb.HeatmapFormat.keys())}")
        g = self.gateway
        r = g.explain(request.image,
                                 class_name=request.class_name if which == "class_name" else None,
                                 class_index=request.class_index if which == "class_index" else None,
                                 top_k=request.top_k, heatmaps=fmt != pb.HEATMAP_FORMAT_NONE,
                                 timeout_s=budget, concepts=list(request.concepts))
        response = pb.ExplainResponse(explanation_id=r.explanation_id, target=class_score_pb(pb, r.target),
                                      predictions=[class_score_pb(pb, c) for c in r.predictions],
                                      concepts=[contribution_pb(pb, c, fmt) for c in r.concepts],
                                      image_height=r.size[0], image_width=r.size[1], model_version=g.spec.version,
                                      grid_height=g.spec.grid[0], grid_width=g.spec.grid[1],
                                      concepts_available=r.available,
                                      requested=[contribution_pb(pb, c, fmt) for c in r.requested])
        # Heatmaps grow with the image; say why instead of failing in the transport (RESOURCE_EXHAUSTED).
        size = response.ByteSize()
        if size > self.max_message_bytes:
            raise errors.InvalidArgument(
                f"the explanation would be {size / 2**20:.0f} MiB, above the gateway's {self.max_message_bytes / 2**20:.0f} MiB "
                f"message limit: ask for fewer concepts (top_k), PNG instead of float16 heatmaps, or a smaller image")
        return response

    def ExplainRegion(self, request, budget):
        pb = self.pb
        g = self.gateway
        region = region_from_pb(request.region if request.HasField("region") else None, g.limits.max_points)
        r = g.explain_region(region, request.explanation_id, request.image, request.top_k,
                                        budget)
        return pb.ExplainRegionResponse(explanation_id=r.explanation_id,
                                        concepts=[activation_pb(pb, a) for a in r.concepts],
                                        region_area=r.area, image_height=r.size[0], image_width=r.size[1],
                                        model_version=g.spec.version)

    def Intervene(self, request, budget):
        pb = self.pb
        g = self.gateway
        max_edits = g.limits.edits_for(g.spec.num_concepts)
        if len(request.edits) > max_edits:  # before converting any of them
            raise errors.InvalidArgument(f"intervene has {len(request.edits)} edits; at most {max_edits} are accepted "
                                         f"for this model ({g.spec.num_concepts} concepts)")
        edits = []
        for n, e in enumerate(request.edits):
            try:
                edits.append(edit_from_pb(e, g.limits.max_points))
            except errors.InvalidArgument as exc:
                raise errors.InvalidArgument(f"edit {n}: {exc}") from None
        r = g.intervene(edits, request.explanation_id, request.image, request.top_k,
                                   budget)
        return pb.InterveneResponse(
            explanation_id=r.explanation_id,
            before=[class_score_pb(pb, c) for c in r.before], after=[class_score_pb(pb, c) for c in r.after],
            predicted_before=class_score_pb(pb, r.predicted_before),
            predicted_after=class_score_pb(pb, r.predicted_after),
            logits_before=r.logits_before.tolist(), logits_after=r.logits_after.tolist(),
            logit_deltas=(r.logits_after - r.logits_before).tolist(),
            region_concepts=[activation_pb(pb, a) for a in r.region_concepts], model_version=g.spec.version)

    def GetModelInfo(self, request, budget):
        g = self.gateway
        spec, backend = g.spec, g.backend
        return self.pb.ModelInfo(
            concepts=list(spec.concepts), classes=list(spec.classes), grid_height=spec.grid[0],
            grid_width=spec.grid[1], input_height=spec.input_size[0], input_width=spec.input_size[1],
            backend=backend.name, backend_target=backend.target, backend_ready=backend.ready(timeout_s=1.0),
            pooling=spec.pooling, radius=spec.radius, flavour=spec.flavour, bundle_sha256=spec.bundle_sha256,
            format_version=spec.format_version, model_version=spec.version, maps_dtype=spec.maps_dtype)

    def GetClassRules(self, request, budget):
        g = self.gateway
        pb, spec = self.pb, g.spec
        rules = [pb.ClassRule(class_index=l, class_name=spec.classes[l], bias=bias,
                              terms=[pb.RuleTerm(concept_index=m, concept_name=spec.concepts[m], weight=w)
                                     for m, w in terms])
                 for l, bias, terms in g.class_rules(request.class_name)]
        return pb.GetClassRulesResponse(rules=rules)
