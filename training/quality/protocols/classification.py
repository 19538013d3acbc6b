"""Protocol 1, classification (Table 1 shape): standard dense and sparse heads on the pooled backbone
features beside the SALF-CBM's dense and sparse heads on its concept scores, with accuracy at NEC = 5."""
from __future__ import annotations

from ..attributions import StandardClassifier
from .features import standardised

NEC = 5
ALPHA = 0.99


def classification(model, train, test, num_classes: int, val=None) -> tuple[dict, StandardClassifier]:
    from training.head import accuracy, fit_dense, fit_path

    f_tr, s_tr, _, y_tr = train
    f_te, s_te, logits_te, y_te = test
    f_va = s_va = y_va = None
    if val is not None:
        f_va, s_va, _, y_va = val
    f_mean, f_std, fs = standardised(f_tr, f_te, *( [f_va] if f_va is not None else []))
    f_tr_z, f_te_z = fs[0], fs[1]
    f_va_z = fs[2] if f_va is not None else None
    own = model.head.linear.weight.detach()
    budget = max(1, int((own != 0).sum(dim=1).max()))
    rows = {}

    def row(name, fit, x_te, concepts=None):
        nz = (fit.weight != 0).sum(dim=1).float()
        rows[name] = {"accuracy": accuracy(x_te, y_te, fit.weight, fit.bias), "nonzero_per_class": float(nz.mean()),
                      "concepts": concepts}

    dense = fit_dense(f_tr_z, y_tr, num_classes, 1e-3, f_va_z, y_va)
    row("standard dense", dense, f_te_z)
    row("standard sparse", fit_path(f_tr_z, y_tr, num_classes, ALPHA, budget, x_val=f_va_z, y_val=y_va), f_te_z)
    row("SALF-CBM dense", fit_dense(s_tr, y_tr, num_classes, 1e-3, s_va, y_va), s_te, s_tr.shape[1])
    kept = int((own != 0).any(dim=0).sum())
    rows["SALF-CBM sparse (the bundle's head)"] = {
        "accuracy": float((logits_te.argmax(1) == y_te).float().mean()),
        "nonzero_per_class": float((own != 0).sum(dim=1).float().mean()), "concepts": kept}
    nec = {"standard": fit_path(f_tr_z, y_tr, num_classes, ALPHA, NEC, x_val=f_va_z, y_val=y_va),
           "SALF-CBM": fit_path(s_tr, y_tr, num_classes, ALPHA, NEC, x_val=s_va, y_val=y_va)}
    for name, fit in nec.items():
        key = next(k for k in rows if k.startswith(name) and ("sparse" in k))
        rows[key][f"accuracy_nec{NEC}"] = accuracy(f_te_z if name == "standard" else s_te, y_te, fit.weight, fit.bias)
    # on the model's device (it shares the model's backbone); the heads are fitted on the CPU features
    classifier = StandardClassifier(model, f_mean, f_std, dense.weight, dense.bias).to(own.device).eval()
    return {"rows": rows, "sparse_budget_per_class": budget, "nec": NEC, "test_images": int(len(y_te))}, classifier
