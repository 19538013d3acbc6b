// The Concept gallery panel: the folder's images with the highest c* of the chosen concept.
import { $ } from "./dom.js";
import { getJSON, latestOnly } from "./requests.js";
import { thumb } from "./images.js";

export const galleryCtl = latestOnly("gallery", async (concept) => {
  if (!concept) { $("gallery").replaceChildren(); return; }
  $("gallery-status").textContent = "scoring the folder...";
  const doc = await getJSON(`/api/gallery?concept=${encodeURIComponent(concept)}&k=8`);
  $("gallery-status").textContent = `top ${doc.images.length} of ${doc.scored} images by c*`;
  $("gallery").replaceChildren(...doc.images.map((g) => thumb(g.index, g.name, `c*=${g.score.toFixed(2)}`)));
});
