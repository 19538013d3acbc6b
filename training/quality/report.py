"""Tables (markdown) and figures (PNG) of an evaluation document from :func:`protocols.run.run_eval`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def classification_table(doc: dict) -> list[str]:
    c = doc["classification"]
    lines = [f"| model | test accuracy | mean non-zero weights per class | concepts | accuracy at NEC={c['nec']} |",
             "|---|---:|---:|---:|---:|"]
    nec_key = f"accuracy_nec{c['nec']}"
    for name, r in c["rows"].items():
        lines.append(f"| {name} | {_f(r['accuracy'])} | {_f(r['nonzero_per_class'], 1)} | {_f(r.get('concepts'))} | "
                     f"{_f(r.get(nec_key))} |")
    return lines


def localisation_table(doc: dict) -> list[str]:
    return localisation_rows(doc["localisation"])


def localisation_rows(loc: dict) -> list[str]:
    """A Table-2-shape markdown table of one :func:`protocols.localisation.localisation` result."""
    if "skipped" in loc:
        return [f"Skipped: {loc['skipped']}."]
    rows = loc["rows"]
    best = {k: max(r[k] for r in rows.values() if not math.isnan(r[k])) for k in ("pixel_accuracy", "miou", "map",
                                                                                     "pointing")}

    def cell(r, k):
        text = _f(r[k])
        return f"**{text}**" if r[k] == best[k] else text

    faith = any("deletion_auc" in r for r in rows.values())
    if faith:
        best["deletion_auc"] = min(r.get("deletion_auc", math.inf) for r in rows.values())
        best["insertion_auc"] = max(r.get("insertion_auc", -math.inf) for r in rows.values())
    lines = ["| heatmap | pixel accuracy | mIoU | mAP | pointing game |" + (" deletion AUC (lower better) | insertion AUC |"
                                                                          if faith else ""),
             "|---|---:|---:|---:|---:|" + ("---:|---:|" if faith else "")]
    for name, r in rows.items():
        extra = f" {cell(r, 'deletion_auc')} | {cell(r, 'insertion_auc')} |" if faith and "deletion_auc" in r else (
            " | |" if faith else "")
        lines.append(f"| {name} | {cell(r, 'pixel_accuracy')} | {cell(r, 'miou')} | {cell(r, 'map')} | "
                     f"{cell(r, 'pointing')} |{extra}")
    for name, why in loc.get("unavailable", {}).items():
        lines.append(f"| {name} | not applicable: {why} | | | |")
    return lines


def concepts_table(doc: dict) -> list[str]:
    cl = doc["concepts_localisation"]
    if "skipped" in cl:
        return [f"Skipped: {cl['skipped']}."]
    per = cl["per_concept"]
    lines = ["| concept | IoU (half) | position-blind | IoU (mean rule) | position-blind | pointing | position-blind |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for c in per["SALF-CBM"]["iou_half"]:
        s, b = per["SALF-CBM"], per["position-blind"]
        lines.append(f"| {c} | {_f(s['iou_half'][c])} | {_f(b['iou_half'][c])} | {_f(s['iou_mean_rule'][c])} | "
                     f"{_f(b['iou_mean_rule'][c])} | {_f(s['pointing'][c])} | {_f(b['pointing'][c])} |")
    m = cl["mean"]
    lines.append(f"| **mean** | {_f(m['SALF-CBM']['iou_half'])} | {_f(m['position-blind']['iou_half'])} | "
                 f"{_f(m['SALF-CBM']['iou_mean_rule'])} | {_f(m['position-blind']['iou_mean_rule'])} | "
                 f"{_f(m['SALF-CBM']['pointing'])} | {_f(m['position-blind']['pointing'])} |")
    return lines


def neurons_table(doc: dict) -> list[str]:
    cn = doc.get("concept_neurons", {})
    if "skipped" in cn or not cn:
        return [f"Skipped: {cn.get('skipped', 'not run')}."]
    k = cn["k"]
    lines = [f"| concept | SALF-CBM neuron precision@{k} | best backbone channel (picked on train) | its precision@{k} | "
             "images with the concept |", "|---|---:|---:|---:|---:|"]
    for name, r in cn["per_concept"].items():
        lines.append(f"| {name} | {_f(r['precision_at_k'])} | {r['channel']} | {_f(r['channel_precision_at_k'])} | "
                     f"{_f(r['present_share'])} |")
    m = cn["mean"]
    lines.append(f"| **mean** | {_f(m['precision_at_k'])} | | {_f(m['channel_precision_at_k'])} | {_f(m['present_share'])} |")
    return lines


def rules_table(doc: dict) -> list[str]:
    r = doc["rules"]
    if "skipped" in r:
        return [f"Skipped: {r['skipped']}."]
    lines = ["| class | defining concepts | weight share on them | largest weights |", "|---|---|---:|---|"]
    for cls, share in r["share"].items():
        top = ", ".join(f"{n} {w:+.2f}" for n, w in r["top_weights"].get(cls, []))
        lines.append(f"| {cls} | {', '.join(r['defining'][cls])} | {_f(share)} | {top} |")
    lines.append(f"| **mean** | | {_f(r['mean_share'])} | |")
    return lines


def cost_table(doc: dict) -> list[str]:
    c = doc["cost"]
    lines = [f"| method | ms per image (batch {c['batch']}) | SALF-CBM is cheaper by |", "|---|---:|---:|"]
    for k, v in c["seconds_per_image"].items():
        ratio = "" if k == "SALF-CBM" else f"{c['times_cheaper'][k]:.1f}x"
        lines.append(f"| {k} | {v * 1000:.2f} | {ratio} |")
    return lines


def generalisation_table(doc: dict) -> list[str]:
    g = doc.get("generalisation") or {"skipped": "not run"}
    if "skipped" in g:
        return [f"Skipped: {g['skipped']}."]
    ind = g["in_distribution"]
    loc_in, loc_sh = doc["localisation"].get("rows", {}), g["localisation"].get("rows", {})

    def best_baseline(rows, key):
        found = {k: v[key] for k, v in rows.items() if k != "SALF-CBM" and not k.startswith("trivial")
                 and not math.isnan(v[key])}
        if not found:
            return "n/a"
        name = max(found, key=found.get)
        return f"{_f(found[name])} ({name})"

    def concept_pointing(cl):
        return _f(cl["mean"]["SALF-CBM"]["pointing"]) if "mean" in cl else "n/a"

    rows = [("images", ind["images"], g["images"]),
            ("object's share of the frame (mean)", f"{ind['foreground_share']:.1%}", f"{g['foreground_share']:.1%}"),
            ("SALF-CBM accuracy", _f(ind["salf_accuracy"]), _f(g["salf_accuracy"])),
            ("standard dense accuracy (same backbone)", _f(ind["standard_accuracy"]), _f(g["standard_accuracy"])),
            ("concept maps: pointing game (mean over concepts)", concept_pointing(doc["concepts_localisation"]),
             concept_pointing(g["concepts_localisation"])),
            ("SALF-CBM class heatmap: pointing game", _f(ind["salf_pointing"]), _f(g["salf_pointing"]))]
    for key, label in (("map", "mAP"), ("miou", "mIoU")):
        rows.append((f"SALF-CBM class heatmap: {label}", _f(loc_in.get("SALF-CBM", {}).get(key)),
                     _f(loc_sh.get("SALF-CBM", {}).get(key))))
        rows.append((f"best baseline heatmap: {label}", best_baseline(loc_in, key), best_baseline(loc_sh, key)))
    lines = ["| | test split (in distribution) | shifted split |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "By the object's share of the frame (accuracy, SALF-CBM / standard dense; SALF-CBM class-heatmap "
              "pointing):", "", "| object size | test: images | accuracy | pointing | shifted: images | accuracy | "
              "pointing |", "|---|---:|---:|---:|---:|---:|---:|"]
    for _, _, name in _size_buckets():
        a, b = ind["by_object_size"].get(name), g["by_object_size"].get(name)
        cells = []
        for r in (a, b):
            cells += ["0", "", ""] if r is None else [
                str(r["images"]), f"{_f(r['salf_accuracy'])} / {_f(r['standard_accuracy'])}", _f(r["salf_pointing"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    p = g.get("pairs")
    if p:
        lines += ["", f"Two-object images ({p['images']} images, {p['objects']} objects):", "",
                  "| | SALF-CBM | standard dense |", "|---|---:|---:|",
                  f"| top-2 classes are the two objects' classes | {_f(p['top2_both_classes']['SALF-CBM'])} | "
                  f"{_f(p['top2_both_classes']['standard dense'])} |",
                  f"| Explain Anything on each object: the region's class is the object's | {_f(p['region_class'])} | |",
                  f"| ... its defining concepts among the region's top concepts | {_f(p['region_defining_in_top'])} | |"]
    return lines


def _size_buckets():
    from .protocols.generalisation import SIZE_BUCKETS

    return SIZE_BUCKETS


def shifted_localisation_table(doc: dict) -> list[str]:
    g = doc.get("generalisation") or {}
    return localisation_rows(g["localisation"]) if "localisation" in g else ["Skipped: no shifted split."]


def tables(doc: dict) -> dict[str, list[str]]:
    if "classification" not in doc:  # the ImageNet-segmentation protocol alone
        return {"ImageNet-segmentation (paper Table 2)": localisation_rows(doc["imagenet_segmentation"])}
    return {"Classification (Table 1 shape)": classification_table(doc),
            "Class heatmaps against the object's silhouette (Table 2 shape)": localisation_table(doc),
            "Concept localisation": concepts_table(doc), "Concept neurons (paper 4.3)": neurons_table(doc),
            "Rules": rules_table(doc),
            "Cost of an explanation": cost_table(doc),
            **({"ImageNet-segmentation (paper Table 2)": localisation_rows(doc["imagenet_segmentation"])}
               if "imagenet_segmentation" in doc else {}),
            "Generalisation: test split vs shifted split": generalisation_table(doc),
            "Class heatmaps on the shifted split (Table 2 shape)": shifted_localisation_table(doc)}


def localisation_figure(doc: dict, path: Path) -> Path | None:
    """Rows: example images; columns: image, object mask, each method's heatmap."""
    examples = doc["localisation"].get("_examples") or []
    if not examples:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(examples[0]["heatmaps"])
    cols = 2 + len(methods)
    fig, axes = plt.subplots(len(examples), cols, figsize=(1.6 * cols, 1.7 * len(examples)), squeeze=False)
    for r, ex in enumerate(examples):
        panels = [("image", ex["image"], None), ("object", ex["mask"], "gray")]
        panels += [(m, ex["heatmaps"][m], "jet") for m in methods]
        for c, (title, arr, cmap) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(arr, cmap=cmap)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def gallery_figure(doc: dict, dataset, path: Path) -> Path | None:
    """One row per concept: its neuron's top-k test images."""
    gallery = (doc.get("concept_neurons") or {}).get("_gallery") or {}
    if not gallery:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(len(v) for v in gallery.values())
    fig, axes = plt.subplots(len(gallery), k, figsize=(1.3 * k, 1.4 * len(gallery)), squeeze=False)
    for r, (name, idx) in enumerate(gallery.items()):
        for c in range(k):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(idx):
                ax.imshow(dataset.image(idx[c]))
        axes[r][0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write(doc: dict, out: Path, dataset=None) -> dict[str, Path]:
    """``eval.json`` (without the example arrays: the figure shows them) and the figures under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    lean = {**doc, **({"localisation": {k: v for k, v in doc["localisation"].items() if k != "_examples"}}
                       if "localisation" in doc else {})}
    if "imagenet_segmentation" in doc:
        lean["imagenet_segmentation"] = {k: v for k, v in doc["imagenet_segmentation"].items() if k != "_examples"}
    if "localisation" in doc.get("generalisation", {}):
        g = doc["generalisation"]
        lean["generalisation"] = {**g, "localisation": {k: v for k, v in g["localisation"].items() if k != "_examples"}}
    if "concept_neurons" in doc:
        lean["concept_neurons"] = {k: v for k, v in doc["concept_neurons"].items() if k != "_gallery"}
    paths = {"json": out / "eval.json"}
    paths["json"].write_text(json.dumps(json.loads(json.dumps(lean, default=_jsonable)), indent=1) + "\n")
    fig = localisation_figure(doc, out / "localisation.png") if "localisation" in doc else None
    if fig is not None:
        paths["localisation"] = fig
    if doc.get("rules", {}).get("terms"):
        from salf.figures import rules_figure  # the plot of `salfctl rules --plot`, one function for both

        rules = list(doc["rules"]["terms"].items())
        rules_figure(rules, f"decision rules: {len(rules)} classes", len(rules)).save(out / "rules.png")
        paths["rules"] = out / "rules.png"
    if dataset is not None:
        fig = gallery_figure(doc, dataset, out / "concept-neurons.png")
        if fig is not None:
            paths["concept-neurons"] = fig
    return paths


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value).__name__)
