// SALF-CBM explorer: plain JavaScript, no build step, nothing loaded from the network.
// Talks only to the `salfctl ui` server it came from (clients/ui/app.py), which talks to the gateway.
//
// Coordinates: the image is drawn on canvases shown at a display scale; every region is sent in
// pixels of the image's own size (gateway.proto: origin top-left, x right, y down, pixel (x, y)
// centred at (x + 0.5, y + 0.5)). displayToImage() is the one mapping from a pointer to image pixels.
"use strict";

const SECRET = new URLSearchParams(location.search).get("secret") || "";
const DISPLAY = 448;          // longer side of the shown image, CSS pixels
const DEBOUNCE_MS = 150;      // slider -> request

// ------------------------------------------------------------------ pure functions (tested in the browser)

// A pointer at (clientX, clientY) over an element whose box is `rect` showing a `width` x `height`
// image -> continuous image coordinates, clamped to the image: x in [0, width], y in [0, height].
function displayToImage(clientX, clientY, rect, width, height) {
  const x = (clientX - rect.left) * width / rect.width;
  const y = (clientY - rect.top) * height / rect.height;
  return { x: Math.min(Math.max(x, 0), width), y: Math.min(Math.max(y, 0), height) };
}

// The box of a drag from a to b (either direction), as gateway.proto's Box [x0, x1) x [y0, y1).
function dragBox(a, b) {
  return [Math.min(a.x, b.x), Math.min(a.y, b.y), Math.max(a.x, b.x), Math.max(a.y, b.y)];
}

// Bilinear upsampling of a row-major [gh, gw] grid to [h, w], align_corners=False (the gateway's rule,
// salf/contract/explain.py): src = (i + 0.5) * in / out - 0.5, clamped at 0 and at in - 1.
function upsample(grid, gh, gw, h, w) {
  function axis(out, inn) {
    const i0 = new Int32Array(out), i1 = new Int32Array(out), f = new Float32Array(out);
    for (let i = 0; i < out; i++) {
      const src = Math.max((i + 0.5) * inn / out - 0.5, 0);
      const a = Math.min(Math.floor(src), inn - 1);
      i0[i] = a; i1[i] = Math.min(a + 1, inn - 1); f[i] = src - a;
    }
    return { i0, i1, f };
  }
  const ry = axis(h, gh), rx = axis(w, gw), out = new Float32Array(h * w);
  for (let y = 0; y < h; y++) {
    const r0 = ry.i0[y] * gw, r1 = ry.i1[y] * gw, fy = ry.f[y];
    for (let x = 0; x < w; x++) {
      const c0 = rx.i0[x], c1 = rx.i1[x], fx = rx.f[x];
      const top = grid[r0 + c0] * (1 - fx) + grid[r0 + c1] * fx;
      const bot = grid[r1 + c0] * (1 - fx) + grid[r1 + c1] * fx;
      out[y * w + x] = top * (1 - fy) + bot * fy;
    }
  }
  return out;
}

// The jet colour map of clients/render.py: t in [0, 1] -> [r, g, b] 0..255.
function jet(t) {
  t = Math.min(Math.max(t, 0), 1);
  const c = (k) => Math.round(255 * Math.min(Math.max(1.5 - Math.abs(4 * t - k), 0), 1));
  return [c(3), c(2), c(1)];
}

// Pixels (x, y) whose centre lies within r of (cx, cy) -> set in `mask` (Uint8Array, width w, height h).
// The same rule as salf/contract/regions.py points_mask.
function stampDisk(mask, w, h, cx, cy, r) {
  const y0 = Math.max(0, Math.floor(cy - r) - 1), y1 = Math.min(h, Math.ceil(cy + r) + 1);
  const x0 = Math.max(0, Math.floor(cx - r) - 1), x1 = Math.min(w, Math.ceil(cx + r) + 1);
  for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) {
    const dx = x + 0.5 - cx, dy = y + 0.5 - cy;
    if (dx * dx + dy * dy <= r * r) mask[y * w + x] = 1;
  }
}

// One request at a time per control: a call while one is in flight replaces the waiting one (only the
// latest value is ever sent next); debounced() also waits `ms` for the control to settle.
function latestOnly(name, run) {
  let busy = false, pending = null, timer = null;
  const stats = (SalfUI.stats[name] = { sent: 0, maxInFlight: 0, inFlight: 0 });
  async function go(args) {
    busy = true; stats.sent++; stats.inFlight++;
    stats.maxInFlight = Math.max(stats.maxInFlight, stats.inFlight);
    try { await run(args); } catch (e) { showError(e); } finally {
      busy = false; stats.inFlight--;
      if (pending) { const p = pending; pending = null; go(p.args); }
    }
  }
  return {
    now(args) { clearTimeout(timer); if (busy) pending = { args }; else go(args); },
    debounced(args, ms = DEBOUNCE_MS) { clearTimeout(timer); timer = setTimeout(() => this.now(args), ms); },
    get idle() { return !busy && !pending; },
  };
}

const SalfUI = { displayToImage, dragBox, upsample, jet, stampDisk, stats: {}, state: null };
window.SalfUI = SalfUI;

// ------------------------------------------------------------------ server calls

class UIError extends Error {
  constructor(code, message) { super(message); this.code = code; }
}

async function api(path, { json, body, headers = {} } = {}) {
  const init = { method: "GET", headers: { ...headers, "X-Salf-Secret": SECRET }, credentials: "same-origin" };
  if (json !== undefined) {
    init.method = "POST"; init.body = JSON.stringify(json); init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.method = "POST"; init.body = body; init.headers["Content-Type"] = "application/octet-stream";
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new UIError("NO_SERVER", "the explorer server does not answer (is `salfctl ui` still running?)");
  }
  if (!resp.ok) {
    let doc = null;
    try { doc = await resp.json(); } catch (e) { /* not JSON */ }
    const err = doc && doc.error ? doc.error : { code: String(resp.status), message: resp.statusText };
    throw new UIError(err.code, err.message);
  }
  clearError();
  return resp;
}
const getJSON = async (path, opts) => (await api(path, opts)).json();

function showError(e) {
  const box = $("error");
  $("error-text").textContent = e instanceof UIError ? `${e.code}: ${e.message}` : String(e);
  box.hidden = false;
}
function clearError() { $("error").hidden = true; }

// ------------------------------------------------------------------ state

const state = {
  model: null,            // ModelInfo (+ grid, input_size)
  image: null,            // {key, name, width, height, point_radius}
  bitmap: null,           // the decoded image as the gateway sees it
  explanation: null,      // the last ExplainResponse
  shown: new Set(),       // concepts whose heatmap is drawn
  region: null,           // {box} | {points, radius} | {mask_png}
  brush: null,            // Uint8Array mask while brushing
  points: [],
  regionAnswer: null,     // ExplainRegion answer
  edits: [],              // concept names picked for the intervention
  intervention: null,     // Intervene answer
  rules: null,
  folderIndex: null,
};
SalfUI.state = state;

function $(id) { return document.getElementById(id); }
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
const fmt = (v, d = 4) => (v >= 0 ? "+" : "") + Number(v).toFixed(d);

// ------------------------------------------------------------------ model and images

async function loadInfo() {
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

function thumb(index, name, caption) {
  const f = el("figure", { "data-index": index, title: name },
    el("img", { src: `/api/folder/thumb/${index}.png`, loading: "lazy", alt: name }), caption ?? shortName(name));
  f.addEventListener("click", () => openFolderImage(index));
  return f;
}
const shortName = (n) => (n.length > 18 ? "..." + n.slice(-16) : n);

async function openFile(file) {
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

// The canvases: backing stores at the image's own size (image, region) or display size (heatmap), all
// shown at the display size.
function layoutStage() {
  const { width: w, height: h } = state.image;
  const s = DISPLAY / Math.max(w, h);
  const dw = Math.max(1, Math.round(w * s)), dh = Math.max(1, Math.round(h * s));
  const stage = $("stage");
  stage.classList.remove("empty");
  stage.style.width = dw + "px"; stage.style.height = dh + "px";
  for (const id of ["image-canvas", "heat-canvas", "region-canvas"]) {
    const c = $(id);
    c.style.width = dw + "px"; c.style.height = dh + "px";
  }
  const ic = $("image-canvas");
  ic.width = w; ic.height = h;
  ic.getContext("2d").drawImage(state.bitmap, 0, 0);
  const hc = $("heat-canvas");
  hc.width = dw; hc.height = dh;
  const rc = $("region-canvas");
  rc.width = dw; rc.height = dh;
  drawHeat(); drawRegion();
}

// ------------------------------------------------------------------ explanation

async function explain(className) {
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

function commonRange() {
  const maps = state.explanation ? state.explanation.concepts.map((c) => c.grid_map) : [];
  let lo = Infinity, hi = -Infinity;
  for (const m of maps) for (const v of m) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  if (!(hi > lo)) { lo = isFinite(lo) ? lo : 0; hi = lo + 1; }
  return [lo, hi];
}

// Heatmaps of `maps` (grid maps on the common scale [lo, hi]; several: the largest at each pixel) over
// the image on `canvas`, at `alpha`.
function paintHeat(canvas, maps, gh, gw, lo, hi, alpha, withImage) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  if (withImage) { ctx.imageSmoothingEnabled = true; ctx.drawImage(state.bitmap, 0, 0, w, h); }
  if (!maps.length) return;
  const ups = maps.map((m) => upsample(m, gh, gw, h, w));
  const over = ctx.getImageData(0, 0, w, h);
  const a = Math.round(alpha * 255);
  for (let i = 0; i < w * h; i++) {
    let v = -Infinity;
    for (const u of ups) v = Math.max(v, u[i]);
    const [r, g, b] = jet((v - lo) / (hi - lo));
    if (withImage) {
      over.data[4 * i] = Math.round((1 - alpha) * over.data[4 * i] + alpha * r);
      over.data[4 * i + 1] = Math.round((1 - alpha) * over.data[4 * i + 1] + alpha * g);
      over.data[4 * i + 2] = Math.round((1 - alpha) * over.data[4 * i + 2] + alpha * b);
    } else {
      over.data[4 * i] = r; over.data[4 * i + 1] = g; over.data[4 * i + 2] = b; over.data[4 * i + 3] = a;
    }
  }
  ctx.putImageData(over, 0, 0);
}

function drawHeat() {
  const c = $("heat-canvas");
  if (!state.image) return;
  const e = state.explanation;
  const maps = e ? e.concepts.filter((x) => state.shown.has(x.name)).map((x) => x.grid_map) : [];
  const [lo, hi] = commonRange();
  paintHeat(c, maps, ...(e ? e.geometry.grid : [1, 1]), lo, hi, $("opacity").value / 100, false);
  const legend = $("scale-legend");
  if (!e || !e.concepts.length) { legend.replaceChildren(); return; }
  const bar = el("canvas", { width: 120, height: 1 });
  const bctx = bar.getContext("2d"), img = bctx.createImageData(120, 1);
  for (let x = 0; x < 120; x++) { const [r, g, b] = jet(x / 119); img.data.set([r, g, b, 255], 4 * x); }
  bctx.putImageData(img, 0, 0);
  legend.replaceChildren(lo.toPrecision(3), bar, `${hi.toPrecision(3)} (common scale)`);
}

function bar(weight, biggest) {
  const b = el("span", { class: "bar " + (weight > 0 ? "pos" : "neg") });
  b.style.width = `${Math.round(120 * Math.abs(weight) / biggest)}px`;  // CSSOM: allowed by the page's CSP
  return b;
}

async function loadRules(className) {
  const doc = await getJSON(`/api/rules?class=${encodeURIComponent(className)}`);
  state.rules = doc;
  $("rules-class").textContent = className;
  const biggest = Math.max(1e-12, ...doc.terms.map((t) => Math.abs(t.weight)));
  $("rules").replaceChildren(el("table", {}, el("tbody", {}, ...doc.terms.map((t) =>
    el("tr", { "data-name": t.concept_name, "data-weight": t.weight },
      el("td", { class: "name" }, t.concept_name), el("td", {}, bar(t.weight, biggest)), el("td", {}, fmt(t.weight)))))));
  if (!doc.terms.length) $("rules").textContent = "no concept has a non-zero weight for this class";
}

// ------------------------------------------------------------------ regions

function tool() { return document.querySelector("input[name=tool]:checked").value; }

function clearRegion(redraw = true) {
  state.region = null; state.brush = null; state.points = []; state.regionAnswer = null; state.intervention = null;
  $("region-info").textContent = "";
  $("region-concepts").tBodies[0].replaceChildren();
  $("intervention").tBodies[0].replaceChildren();
  $("intervene-summary").textContent = "pick a region and at least one concept";
  if (redraw) drawRegion();
}

function pointer(ev) {
  const { width, height } = state.image;
  return displayToImage(ev.clientX, ev.clientY, $("region-canvas").getBoundingClientRect(), width, height);
}

let drag = null;
function onDown(ev) {
  if (!state.image || ev.button !== 0) return;
  ev.preventDefault();
  $("region-canvas").setPointerCapture(ev.pointerId);
  const p = pointer(ev), t = tool();
  if (t === "box") {
    drag = { start: p, end: p };
  } else if (t === "brush") {
    const { width: w, height: h } = state.image;
    if (!state.brush || !state.region || !state.region.mask_png) state.brush = new Uint8Array(w * h);
    drag = { last: p };
    stampDisk(state.brush, w, h, p.x, p.y, brushRadius());
  } else {
    state.points.push([p.x, p.y]);
    finishRegion({ points: state.points.slice(), radius: state.image.point_radius });
    return;
  }
  drawRegion();
}

function brushRadius() {  // the brush slider is in display pixels
  return Number($("brush-size").value) * state.image.width / $("region-canvas").getBoundingClientRect().width;
}

function onMove(ev) {
  if (!drag) return;
  const p = pointer(ev);
  if (tool() === "box") {
    drag.end = p;
  } else {
    const { width: w, height: h } = state.image, r = brushRadius();
    const d = Math.hypot(p.x - drag.last.x, p.y - drag.last.y), n = Math.max(1, Math.ceil(d / Math.max(r / 2, 0.5)));
    for (let k = 1; k <= n; k++) {
      stampDisk(state.brush, w, h, drag.last.x + (p.x - drag.last.x) * k / n, drag.last.y + (p.y - drag.last.y) * k / n, r);
    }
    drag.last = p;
  }
  drawRegion();
}

function onUp(ev) {
  if (!drag) return;
  const d = drag; drag = null;
  if (tool() === "box") {
    const b = dragBox(d.start, pointer(ev));
    if (b[2] - b[0] < 1e-6 || b[3] - b[1] < 1e-6) { drawRegion(); return; }  // a click, not a box
    finishRegion({ box: b });
  } else {
    finishRegion({ mask_png: maskPng() });
  }
}

function maskPng() {  // the brushed mask as an RGBA PNG: alpha 255 inside, 0 outside (gateway.proto mask rule)
  const { width: w, height: h } = state.image;
  const c = el("canvas", { width: w, height: h }), ctx = c.getContext("2d"), img = ctx.createImageData(w, h);
  for (let i = 0; i < w * h; i++) if (state.brush[i]) img.data.set([255, 255, 255, 255], 4 * i);
  ctx.putImageData(img, 0, 0);
  return c.toDataURL("image/png").split(",")[1];
}

function finishRegion(region) {
  state.region = region;
  if (region.box) {
    $("region-info").textContent = `box x0=${region.box[0].toFixed(2)} y0=${region.box[1].toFixed(2)} ` +
      `x1=${region.box[2].toFixed(2)} y1=${region.box[3].toFixed(2)} (image pixels)`;
  } else if (region.points) {
    $("region-info").textContent = `${region.points.length} point(s), radius ${region.radius.toFixed(1)} px`;
  } else {
    $("region-info").textContent = "brushed region";
  }
  $("region-info").dataset.region = JSON.stringify(region);
  drawRegion();
  regionCtl.now();
  interveneCtl.now();
}

function drawRegion() {
  const c = $("region-canvas"), ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  if (!state.image) return;
  const sx = c.width / state.image.width, sy = c.height / state.image.height;
  ctx.lineWidth = 2; ctx.strokeStyle = "#fff"; ctx.fillStyle = "rgba(255,255,255,0.25)";
  const box = drag && drag.start ? dragBox(drag.start, drag.end) : state.region && state.region.box;
  if (box) {
    ctx.fillRect(box[0] * sx, box[1] * sy, (box[2] - box[0]) * sx, (box[3] - box[1]) * sy);
    ctx.strokeRect(box[0] * sx, box[1] * sy, (box[2] - box[0]) * sx, (box[3] - box[1]) * sy);
  }
  if (state.brush && (drag || (state.region && state.region.mask_png))) {
    const { width: w, height: h } = state.image;
    const m = el("canvas", { width: w, height: h }), mctx = m.getContext("2d"), img = mctx.createImageData(w, h);
    for (let i = 0; i < w * h; i++) if (state.brush[i]) img.data.set([255, 255, 255, 110], 4 * i);
    mctx.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(m, 0, 0, c.width, c.height);
  }
  if (state.points.length && !(state.region && state.region.box)) {
    for (const [x, y] of state.points) {
      ctx.beginPath();
      ctx.ellipse(x * sx, y * sy, state.image.point_radius * sx, state.image.point_radius * sy, 0, 0, 2 * Math.PI);
      ctx.fill(); ctx.stroke();
    }
  }
}

const regionCtl = latestOnly("region", async () => {
  if (!state.region || !state.explanation) return;
  const key = state.image.key, region = state.region;
  const doc = await getJSON("/api/region", { json: { key, explanation_id: state.explanation.explanation_id, region, top_k: 8 } });
  if (state.image.key !== key || state.region !== region) return;
  state.regionAnswer = doc;
  $("region-info").textContent = $("region-info").textContent.replace(/ -- .*$/, "") + ` -- ${doc.area} px`;
  $("region-concepts").tBodies[0].replaceChildren(...doc.concepts.map((c) =>
    el("tr", { "data-name": c.name, "data-activation": c.activation, "data-mean": c.mean_activation },
      el("td", {}, editBox(c.name)), el("td", { class: "name" }, c.name),
      el("td", {}, fmt(c.activation, 3)), el("td", {}, fmt(c.mean_activation, 4)))));
});

// ------------------------------------------------------------------ intervention

function editBox(name) {
  const box = el("input", { type: "checkbox", class: "edit", "data-name": name, checked: state.edits.includes(name),
                            title: "edit this concept" });
  box.addEventListener("change", () => setEdit(name, box.checked));
  return box;
}

function setEdit(name, on) {
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

const interveneCtl = latestOnly("intervene", async () => {
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

// ------------------------------------------------------------------ gallery and downloads

const galleryCtl = latestOnly("gallery", async (concept) => {
  if (!concept) { $("gallery").replaceChildren(); return; }
  $("gallery-status").textContent = "scoring the folder...";
  const doc = await getJSON(`/api/gallery?concept=${encodeURIComponent(concept)}&k=8`);
  $("gallery-status").textContent = `top ${doc.images.length} of ${doc.scored} images by c*`;
  $("gallery").replaceChildren(...doc.images.map((g) => thumb(g.index, g.name, `c*=${g.score.toFixed(2)}`)));
});

function download(blob, name) {
  const a = el("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}
const baseName = () => state.image.name.replace(/\.[^.]*$/, "") || "image";

async function downloadFigure() {
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

function downloadJson() {
  download(new Blob([JSON.stringify(onScreen(), null, 1)], { type: "application/json" }), `${baseName()}.salf.json`);
}

// ------------------------------------------------------------------ wiring

function wire() {
  $("error-close").addEventListener("click", clearError);
  $("file").addEventListener("change", (ev) => openFile(ev.target.files[0]).catch(showError));
  document.addEventListener("dragover", (ev) => { ev.preventDefault(); $("stage").classList.add("dragover"); });
  document.addEventListener("dragleave", () => $("stage").classList.remove("dragover"));
  document.addEventListener("drop", (ev) => {
    ev.preventDefault(); $("stage").classList.remove("dragover");
    if (ev.dataTransfer.files.length) openFile(ev.dataTransfer.files[0]).catch(showError);
  });
  const rc = $("region-canvas");
  rc.addEventListener("pointerdown", onDown);
  rc.addEventListener("pointermove", onMove);
  rc.addEventListener("pointerup", onUp);
  rc.addEventListener("pointercancel", () => { drag = null; drawRegion(); });
  $("region-clear").addEventListener("click", () => clearRegion());
  document.querySelectorAll("input[name=tool]").forEach((r) => r.addEventListener("change", () => clearRegion()));
  $("opacity").addEventListener("input", drawHeat);
  $("class-select").addEventListener("change", (ev) => state.image && explain(ev.target.value).catch(showError));
  $("concept-select").addEventListener("change", (ev) => { if (ev.target.value) setEdit(ev.target.value, true); ev.target.value = ""; });
  $("beta").addEventListener("input", () => {
    $("beta-value").textContent = Number($("beta").value).toFixed(1);
    interveneCtl.debounced();
  });
  $("gallery-select").addEventListener("change", (ev) => galleryCtl.now(ev.target.value));
  $("download-figure").addEventListener("click", () => downloadFigure().catch(showError));
  $("download-json").addEventListener("click", downloadJson);
  SalfUI.idle = () => regionCtl.idle && interveneCtl.idle && galleryCtl.idle;
  loadInfo().then(() => { SalfUI.ready = true; }).catch((e) => { showError(e); SalfUI.ready = true; });
}

document.addEventListener("DOMContentLoaded", wire);
