"""Protocol 4, rules: the share of each class's head weight on its defining concepts (synthetic set)."""
from __future__ import annotations

import numpy as np

from .. import metrics


def defining_concepts(classes: list[str]) -> dict[str, list[str]]:
    """The synthetic set's class -> its defining concepts (shape + texture, or circle + string/grass)."""
    from training.data.world import CLASSES

    rules = {}
    for rule in CLASSES:
        if rule.name in classes:
            extra = rule.texture if rule.texture else ("string" if rule.placement == "balloon" else "grass")
            rules[rule.name] = [rule.shape, extra]
    return rules


def rules(model, concepts: list[str], classes: list[str]) -> dict:
    defining = defining_concepts(classes)
    if defining and not any(x in concepts for d in defining.values() for x in d):
        return {"skipped": "none of the classes' defining concepts is among the model's (a class-concept model?)"}
    if not defining:
        return {"skipped": "no defining concepts known for these classes (the synthetic set's)"}
    w = model.head.linear.weight.detach().cpu().numpy()
    idx = {classes.index(c): [concepts.index(x) for x in d if x in concepts] for c, d in defining.items()}
    share = metrics.weight_share(w, idx)
    per_class = {classes[k]: v for k, v in share.items()}
    top = {classes[k]: [(concepts[m], float(w[k, m])) for m in np.argsort(-np.abs(w[k]))[:4] if w[k, m] != 0]
           for k in idx}
    terms = {c: [(concepts[m], float(w[k, m])) for m in np.argsort(-np.abs(w[k]), kind="stable") if w[k, m] != 0]
             for k, c in enumerate(classes)}
    return {"share": per_class, "mean_share": float(np.nanmean(list(per_class.values()))),
            "defining": defining, "top_weights": top, "terms": terms}
