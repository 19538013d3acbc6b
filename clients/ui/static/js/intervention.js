// The Local intervention panel: the concepts picked for editing (edit boxes, chips) and /api/intervene
// for c[concept] += beta inside the region, shown as the classes' scores before and after.
import { state } from "./state.js";
import { $, el, fmt } from "./dom.js";
import { getJSON, latestOnly } from "./requests.js";

export function editBox(name) {
  const box = el("input", { type: "checkbox", class: "edit", "data-name": name, checked: state.edits.includes(name),
                            title: "edit this concept" });
  box.addEventListener("change", () => setEdit(name, box.checked));
  return box;
}

export function setEdit(name, on) {
  state.edits = state.edits.filter((n) => n !== name);
  if (on) state.edits.push(name);
  renderEdits();
  interveneCtl.now();
}

function renderEdits() {
  $("edit-list").replaceChildren(...state.edits.map((n) => {
    const x = el("button", { type: "button", title: "remove" }, "\u00d7");
    x.addEventListener("click", () => setEdit(n, false));
    return el("span", { "data-name": n }, n, x);
  }));
  document.querySelectorAll("input.edit").forEach((b) => { b.checked = state.edits.includes(b.dataset.name); });
}

export const interveneCtl = latestOnly("intervene", async () => {
  if (!state.region || !state.explanation || !state.edits.length) return;
  const key = state.image.key, region = state.region, beta = Number($("beta").value);
  const edits = state.edits.map((concept) => ({ concept, beta }));
  const doc = await getJSON("/api/intervene", { json: { key, explanation_id: state.explanation.explanation_id,
                                                         region, edits, top_k: Math.min(5, state.model.classes.length) } });
  if (state.image.key !== key || state.region !== region) return;
  state.intervention = doc;
  const b = doc.predicted_before, a = doc.predicted_after;
  const summary = $("intervene-summary");
  summary.textContent = `${state.edits.join(", ")} += ${beta} in the region: ${b.name} (${b.probability.toFixed(3)}) ` +
    `\u2192 ${a.name} (${a.probability.toFixed(3)})`;
  summary.dataset.beta = beta;
  summary.dataset.after = a.name;
  const after = new Map(doc.after.map((c) => [c.name, c]));
  const before = new Map(doc.before.map((c) => [c.name, c]));
  const names = [...new Set([...doc.before.map((c) => c.name), ...doc.after.map((c) => c.name)])];
  const classes = state.model.classes;
  $("intervention").tBodies[0].replaceChildren(...names.map((n) => {
    const i = classes.indexOf(n), lb = doc.logits_before[i], la = doc.logits_after[i];
    const pb = before.get(n), pa = after.get(n), d = doc.logit_deltas[n];
    return el("tr", { "data-name": n, "data-logit-before": lb, "data-logit-after": la, "data-delta": d },
      el("td", { class: "name" }, n),
      el("td", {}, pb ? pb.probability.toFixed(4) : "-"),
      el("td", { class: pa && pb ? (pa.probability > pb.probability + 5e-4 ? "up" : pa.probability < pb.probability - 5e-4 ? "down" : "") : "" },
         pa ? pa.probability.toFixed(4) : "-"),
      el("td", {}, fmt(d, 3)));
  }));
});
