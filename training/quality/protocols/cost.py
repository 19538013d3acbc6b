"""Protocol 5, cost: seconds per explained image, SALF-CBM against GradCAM and Integrated Gradients."""
from __future__ import annotations

import torch

from training.model import normalize_uint8

from ..attributions import StandardClassifier, baseline_maps, seconds_per_image


def cost(model, classifier: StandardClassifier, dataset, batch: int = 8, repeats: int = 3) -> dict:
    spec = model.backbone.spec
    images = torch.stack([dataset[i][0] for i in range(min(batch, len(dataset)))])

    @torch.no_grad()
    def salf(x):
        maps, scores, logits = model(normalize_uint8(x, spec.mean, spec.std))
        target = logits.argmax(1)
        contrib = model.head.linear.weight[target] * scores
        top = contrib.topk(min(5, maps.shape[1]), dim=1).indices
        chosen = torch.stack([maps[b, top[b]] for b in range(len(x))])
        return torch.nn.functional.interpolate(chosen, size=tuple(x.shape[1:3]), mode="bilinear", align_corners=False)

    def with_target(method):
        def run(x):
            with torch.no_grad():
                target = classifier(normalize_uint8(x, spec.mean, spec.std)).argmax(1)
            return baseline_maps(method, classifier, x, target, spec.mean, spec.std)
        return run

    out = {"batch": len(images), "seconds_per_image": {"SALF-CBM": seconds_per_image(salf, images, repeats)}}
    for method in ("GradCAM", "Integrated Gradients"):
        out["seconds_per_image"][method] = seconds_per_image(with_target(method), images, repeats)
    base = out["seconds_per_image"]["SALF-CBM"]
    out["times_cheaper"] = {k: v / base for k, v in out["seconds_per_image"].items() if k != "SALF-CBM"}
    return out
