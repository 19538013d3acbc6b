// The two downloads: the composed figure (PNG, drawn by the server) and what is on screen as JSON.
import { state } from "./state.js";
import { $, el } from "./dom.js";
import { api } from "./requests.js";
import { commonRange } from "./stage.js";

function download(blob, name) {
  const a = el("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}
const baseName = () => state.image.name.replace(/\.[^.]*$/, "") || "image";

export async function downloadFigure() {
  const e = state.explanation;
  const concepts = e.concepts.filter((c) => state.shown.has(c.name)).map((c) => c.name);
  const blob = await (await api("/api/figure", { json: { key: state.image.key, class_name: e.target.name,
    concepts: concepts.length ? concepts : e.concepts.map((c) => c.name), region: state.region } })).blob();
  download(blob, `${baseName()}.salf.png`);
}

function onScreen() {  // what the page shows, as one JSON document
  const e = state.explanation;
  return {
    image: { name: state.image.name, width: state.image.width, height: state.image.height },
    model: { version: state.model.model_version, backend: state.model.backend },
    explanation: e, shown_concepts: [...state.shown], common_scale: commonRange(),
    region: state.region, region_concepts: state.regionAnswer,
    intervention: state.intervention && { beta: Number($("beta").value), concepts: state.edits, ...state.intervention },
    rules: state.rules,
  };
}

export function downloadJson() {
  download(new Blob([JSON.stringify(onScreen(), null, 1)], { type: "application/json" }), `${baseName()}.salf.json`);
}
