// The Prediction and Top concepts panels: explain a class of the open image, then list its predictions
// and its concepts (show / edit boxes, a mini heatmap each, contributions) and refresh what depends on it.
import { state } from "./state.js";
import { $, el, fmt } from "./dom.js";
import { getJSON, showError } from "./requests.js";
import { commonRange, drawHeat, paintHeat } from "./stage.js";
import { loadRules } from "./rules.js";
import { regionCtl } from "./region.js";
import { editBox, interveneCtl } from "./intervention.js";

export async function explain(className) {
  const key = state.image.key;
  const doc = await getJSON("/api/explain", { json: { key, class_name: className || null, top_k: 8 } });
  if (!state.image || state.image.key !== key) return;  // another image was opened meanwhile
  state.explanation = doc;
  if (state.shown.size === 0 && doc.concepts.length) state.shown.add(doc.concepts[0].name);
  renderExplanation();
  drawHeat();
  loadRules(doc.target.name);
  if (state.region) { regionCtl.now(); interveneCtl.now(); }
}

function renderExplanation() {
  const e = state.explanation;
  $("target-name").textContent = `${e.target.name} (p = ${e.target.probability.toFixed(3)})`;
  $("predictions").tBodies[0].replaceChildren(...e.predictions.map((c) => {
    const tr = el("tr", { class: "clickable" + (c.index === e.target.index ? " selected" : ""), "data-name": c.name,
                          "data-probability": c.probability, title: "explain this class" },
      el("td", { class: "name" }, c.name), el("td", {}, c.probability.toFixed(4)), el("td", {}, fmt(c.logit, 3)));
    tr.addEventListener("click", () => { $("class-select").value = c.name; explain(c.name).catch(showError); });
    return tr;
  }));
  const [lo, hi] = commonRange();
  const [gh, gw] = e.geometry.grid;
  $("concepts").tBodies[0].replaceChildren(...e.concepts.map((c) => {
    const show = el("input", { type: "checkbox", checked: state.shown.has(c.name), title: "show its heatmap" });
    show.addEventListener("change", () => { show.checked ? state.shown.add(c.name) : state.shown.delete(c.name); drawHeat(); });
    const mini = el("canvas", { width: 48, height: Math.max(1, Math.round(48 * state.image.height / state.image.width)) });
    paintHeat(mini, [c.grid_map], gh, gw, lo, hi, 0.6, true);
    return el("tr", { "data-name": c.name, "data-contribution": c.contribution },
      el("td", {}, show), el("td", {}, editBox(c.name)), el("td", {}, mini), el("td", { class: "name" }, c.name),
      el("td", {}, fmt(c.contribution)), el("td", {}, fmt(c.weight)), el("td", {}, fmt(c.score, 3)));
  }));
  if (!e.concepts.length) {
    $("concepts").tBodies[0].replaceChildren(el("tr", {}, el("td", { colSpan: 7 }, `no concept has a weight for ${e.target.name}`)));
  }
}
