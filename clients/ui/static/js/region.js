// Explain Anything: drawing a region on the image (box, brush, points) in image pixels, drawing it on
// the region canvas, and the region's top concepts from /api/region.
import { state } from "./state.js";
import { $, el, fmt } from "./dom.js";
import { getJSON, latestOnly } from "./requests.js";
import { displayToImage, dragBox, stampDisk } from "./geometry.js";
import { editBox, interveneCtl } from "./intervention.js";

function tool() { return document.querySelector("input[name=tool]:checked").value; }

export function clearRegion(redraw = true) {
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

export function drawRegion() {
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

export const regionCtl = latestOnly("region", async () => {
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

// The region canvas's pointer events (they share the drag in progress, `drag`, with the functions above).
export function wireRegion() {
  const rc = $("region-canvas");
  rc.addEventListener("pointerdown", onDown);
  rc.addEventListener("pointermove", onMove);
  rc.addEventListener("pointerup", onUp);
  rc.addEventListener("pointercancel", () => { drag = null; drawRegion(); });
}
