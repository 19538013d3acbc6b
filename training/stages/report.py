"""What a training run measured: ``report.json`` (:class:`TrainReport`) and the line `salfctl train` prints."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..explain import Explanation
from ..runtime import atomic_write_json
from .context import Context


@dataclass
class TrainReport:
    """What `train head` / `train all` measured and wrote; ``report.json`` is :meth:`to_json`."""
    bundle: Path
    metrics: dict  # accuracies, sparsity, concepts kept, IoU vs baseline (also in bundle.json)
    dropped_concepts: list[dict]
    explanation: Explanation
    explained_image: str
    true_class: str
    timings_s: dict[str, float]
    config: dict
    wall_seconds: float | None = None

    def to_json(self) -> dict:
        doc = {"bundle": str(self.bundle), **self.metrics, "dropped_concepts": self.dropped_concepts,
               "explanation": {"image": self.explained_image, "true_class": self.true_class,
                               **self.explanation.to_dict()},
               "timings_s": {k: round(v, 2) for k, v in self.timings_s.items()}, "config": self.config}
        if self.wall_seconds is not None:
            doc["wall_seconds"] = round(self.wall_seconds, 1)
        return finite(doc)

    def write(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())


def build_report(ctx: Context, ev, head, info: dict, test, metrics: dict) -> TrainReport:
    """The report, with the explanation of one test image (the gateway's ranking of concepts)."""
    from ..explain import explain_maps

    ex = ev.example
    explanation = explain_maps(ex["maps"], ex["scores"], ex["logits"], head.weight, info["concepts"], test.classes,
                               ctx.cfg.backbone.input_size, k=3,
                               placement=(info.get("similarity") or {}).get("grid_placement", "stride"))
    return TrainReport(bundle=ctx.run.bundle, metrics=metrics, dropped_concepts=info["dropped"],
                       explanation=explanation, explained_image=str(test.paths[ex["index"]]),
                       true_class=test.classes[ex["label"]], timings_s=dict(ctx.timings), config=ctx.cfg.to_dict())


def finite(doc):
    """JSON has no NaN: map non-finite floats to None, recursively."""
    if isinstance(doc, dict):
        return {k: finite(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [finite(v) for v in doc]
    if isinstance(doc, float) and doc != doc:
        return None
    return doc


def summary_line(report: dict) -> str:
    """The one-line summary `salfctl train` prints at the end (``report``: :meth:`TrainReport.to_json`)."""
    parts = [f"test accuracy {report['test_accuracy']:.3f}"]
    if report.get("dense_baseline_test_accuracy") is not None:
        parts[0] += f" (dense baseline {report['dense_baseline_test_accuracy']:.3f})"
    if report.get("iou_mean") is not None:
        base = report.get("iou_baseline_mean")
        parts.append(f"concept-map IoU {report['iou_mean']:.3f}" +
                     (f" (position-blind baseline {base:.3f})" if base is not None else ""))
    nz = report["nonzero_weights"]
    per = nz / max(len(report["nonzero_per_class"]), 1)
    parts.append(f"{report['concepts_kept']}/{report['concepts_total']} concepts kept")
    parts.append(f"{nz} non-zero weights ({per:.1f} per class)")
    return " | ".join(parts)
