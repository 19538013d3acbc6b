// The model line and the images: /api/info (model, folder strip, the selects), opening a file or a
// folder image, and showing it (a new image resets the region and explains its predicted class).
import { state } from "./state.js";
import { $, el } from "./dom.js";
import { api, getJSON } from "./requests.js";
import { layoutStage } from "./stage.js";
import { clearRegion } from "./region.js";
import { explain } from "./explanation.js";

export async function loadInfo() {
  const info = await getJSON("/api/info");
  state.model = info.model;
  const m = info.model;
  $("model-info").textContent = `${m.backend} backend (${info.gateway}), model version ${m.model_version}: ` +
    `${m.concepts.length} concepts, ${m.classes.length} classes, grid ${m.grid.join("x")}`;
  fillSelect($("class-select"), m.classes, "(predicted class)");
  fillSelect($("concept-select"), m.concepts, "choose...");
  fillSelect($("gallery-select"), m.concepts, "choose...");
  if (info.files.length) {
    $("folder-strip").hidden = false;
    $("folder-name").textContent = `${info.folder} (${info.files.length})`;
    const list = $("folder-list");
    list.replaceChildren(...info.files.map((name, i) => thumb(i, name, null)));
  } else {
    $("gallery-section").hidden = true;
  }
}

function fillSelect(select, names, first) {
  select.replaceChildren(el("option", { value: "" }, first), ...names.map((n) => el("option", { value: n }, n)));
}

export function thumb(index, name, caption) {
  const f = el("figure", { "data-index": index, title: name },
    el("img", { src: `/api/folder/thumb/${index}.png`, loading: "lazy", alt: name }), caption ?? shortName(name));
  f.addEventListener("click", () => openFolderImage(index));
  return f;
}
const shortName = (n) => (n.length > 18 ? "..." + n.slice(-16) : n);

export async function openFile(file) {
  if (!file) return;
  const doc = await getJSON("/api/image", { body: await file.arrayBuffer(),
                                            headers: { "X-Filename": encodeURIComponent(file.name) } });
  state.folderIndex = null;
  await showImage(doc);
}

async function openFolderImage(index) {
  const doc = await getJSON("/api/folder/open", { json: { index } });
  state.folderIndex = index;
  document.querySelectorAll("#folder-list figure").forEach((f) =>
    f.classList.toggle("current", Number(f.dataset.index) === index));
  await showImage(doc);
}

async function showImage(doc) {
  const blob = await (await api(`/api/image/${doc.key}.png`)).blob();
  state.bitmap = await createImageBitmap(blob);
  state.image = doc;
  state.explanation = null; state.regionAnswer = null; state.intervention = null;
  state.shown = new Set();
  clearRegion(false);
  $("image-name").textContent = `${doc.name}: ${doc.width} x ${doc.height} px`;
  layoutStage();
  $("download-figure").disabled = false; $("download-json").disabled = false;
  await explain("");
}
