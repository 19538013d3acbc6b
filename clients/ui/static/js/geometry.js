// Pure functions of the explorer (no DOM, no state): the display -> image mapping, a drag's box, the
// heatmap's upsampling and colour map, the brush's disks. The browser tests call them via window.SalfUI.
//
// Coordinates: the image is drawn on canvases shown at a display scale; every region is sent in
// pixels of the image's own size (gateway.proto: origin top-left, x right, y down, pixel (x, y)
// centred at (x + 0.5, y + 0.5)). displayToImage() is the one mapping from a pointer to image pixels.

// A pointer at (clientX, clientY) over an element whose box is `rect` showing a `width` x `height`
// image -> continuous image coordinates, clamped to the image: x in [0, width], y in [0, height].
export function displayToImage(clientX, clientY, rect, width, height) {
  const x = (clientX - rect.left) * width / rect.width;
  const y = (clientY - rect.top) * height / rect.height;
  return { x: Math.min(Math.max(x, 0), width), y: Math.min(Math.max(y, 0), height) };
}

// The box of a drag from a to b (either direction), as gateway.proto's Box [x0, x1) x [y0, y1).
export function dragBox(a, b) {
  return [Math.min(a.x, b.x), Math.min(a.y, b.y), Math.max(a.x, b.x), Math.max(a.y, b.y)];
}

// Bilinear upsampling of a row-major [gh, gw] grid to [h, w], align_corners=False (the gateway's rule,
// salf/contract/explain.py): src = (i + 0.5) * in / out - 0.5, clamped at 0 and at in - 1.
export function upsample(grid, gh, gw, h, w) {
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
export function jet(t) {
  t = Math.min(Math.max(t, 0), 1);
  const c = (k) => Math.round(255 * Math.min(Math.max(1.5 - Math.abs(4 * t - k), 0), 1));
  return [c(3), c(2), c(1)];
}

// Pixels (x, y) whose centre lies within r of (cx, cy) -> set in `mask` (Uint8Array, width w, height h).
// The same rule as salf/contract/regions.py points_mask.
export function stampDisk(mask, w, h, cx, cy, r) {
  const y0 = Math.max(0, Math.floor(cy - r) - 1), y1 = Math.min(h, Math.ceil(cy + r) + 1);
  const x0 = Math.max(0, Math.floor(cx - r) - 1), x1 = Math.min(w, Math.ceil(cx + r) + 1);
  for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) {
    const dx = x + 0.5 - cx, dy = y + 0.5 - cy;
    if (dx * dx + dy * dy <= r * r) mask[y * w + x] = 1;
  }
}
