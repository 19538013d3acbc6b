// What is on screen, in one `state` object, and the page's test hook `window.SalfUI` (the pure functions,
// latestOnly's request counters, the state; app.js adds `idle` and `ready`).
import { displayToImage, dragBox, upsample, jet, stampDisk } from "./geometry.js";

export const SalfUI = { displayToImage, dragBox, upsample, jet, stampDisk, stats: {}, state: null };
window.SalfUI = SalfUI;

export const state = {
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
