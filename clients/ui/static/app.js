// SALF-CBM explorer: plain JavaScript, no build step, nothing loaded from the network.
// Talks only to the `salfctl ui` server it came from (clients/ui/app.py), which talks to the gateway.
//
// Native ES modules, no build step (index.html loads this one as type=module): js/geometry.js (pure
// functions), js/state.js (what is on screen, window.SalfUI), js/dom.js, js/requests.js (server calls),
// one module per panel (images, stage, explanation, rules, region, intervention, gallery, downloads).
// This one wires the page's controls to them once the page is parsed.
import { SalfUI, state } from "./js/state.js";
import { $ } from "./js/dom.js";
import { clearError, showError } from "./js/requests.js";
import { loadInfo, openFile } from "./js/images.js";
import { drawHeat } from "./js/stage.js";
import { clearRegion, regionCtl, wireRegion } from "./js/region.js";
import { explain } from "./js/explanation.js";
import { interveneCtl, setEdit } from "./js/intervention.js";
import { galleryCtl } from "./js/gallery.js";
import { downloadFigure, downloadJson } from "./js/downloads.js";

function wire() {
  $("error-close").addEventListener("click", clearError);
  $("file").addEventListener("change", (ev) => openFile(ev.target.files[0]).catch(showError));
  document.addEventListener("dragover", (ev) => { ev.preventDefault(); $("stage").classList.add("dragover"); });
  document.addEventListener("dragleave", () => $("stage").classList.remove("dragover"));
  document.addEventListener("drop", (ev) => {
    ev.preventDefault(); $("stage").classList.remove("dragover");
    if (ev.dataTransfer.files.length) openFile(ev.dataTransfer.files[0]).catch(showError);
  });
  wireRegion();
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
