// The image stage: its canvases laid out at the display size, and the concept heatmaps drawn over the
// image on one common colour scale (with its legend).
import { state } from "./state.js";
import { $, el } from "./dom.js";
import { upsample, jet } from "./geometry.js";
import { drawRegion } from "./region.js";

const DISPLAY = 448;          // longer side of the shown image, CSS pixels

// The canvases: backing stores at the image's own size (image, region) or display size (heatmap), all
// shown at the display size.
export function layoutStage() {
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

export function commonRange() {
  const maps = state.explanation ? state.explanation.concepts.map((c) => c.grid_map) : [];
  let lo = Infinity, hi = -Infinity;
  for (const m of maps) for (const v of m) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  if (!(hi > lo)) { lo = isFinite(lo) ? lo : 0; hi = lo + 1; }
  return [lo, hi];
}

// Heatmaps of `maps` (grid maps on the common scale [lo, hi]; several: the largest at each pixel) over
// the image on `canvas`, at `alpha`.
export function paintHeat(canvas, maps, gh, gw, lo, hi, alpha, withImage) {
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

export function drawHeat() {
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
