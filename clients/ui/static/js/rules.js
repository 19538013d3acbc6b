// The Rules panel: the explained class's non-zero concept weights (its global decision rule), each with a bar.
import { state } from "./state.js";
import { $, el, fmt } from "./dom.js";
import { getJSON } from "./requests.js";

function bar(weight, biggest) {
  const b = el("span", { class: "bar " + (weight > 0 ? "pos" : "neg") });
  b.style.width = `${Math.round(120 * Math.abs(weight) / biggest)}px`;  // CSSOM: allowed by the page's CSP
  return b;
}

export async function loadRules(className) {
  const doc = await getJSON(`/api/rules?class=${encodeURIComponent(className)}`);
  state.rules = doc;
  $("rules-class").textContent = className;
  const biggest = Math.max(1e-12, ...doc.terms.map((t) => Math.abs(t.weight)));
  $("rules").replaceChildren(el("table", {}, el("tbody", {}, ...doc.terms.map((t) =>
    el("tr", { "data-name": t.concept_name, "data-weight": t.weight },
      el("td", { class: "name" }, t.concept_name), el("td", {}, bar(t.weight, biggest)), el("td", {}, fmt(t.weight)))))));
  if (!doc.terms.length) $("rules").textContent = "no concept has a non-zero weight for this class";
}
