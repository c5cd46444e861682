"use strict";
// Loaded in <head>, before any card: the capturing listeners see every poster's load or failure.
// A poster that cannot load (an output rendered before posters existed) leaves a placeholder;
// pointing at (or focusing) a thumbnail plays its video, or its animated preview, in place.
document.addEventListener("error", (event) => {
  const card = event.target instanceof HTMLImageElement && event.target.closest(".card");
  if (card && !card.classList.contains("playing")) card.classList.add("no-poster");
}, true);

function start(thumb) {
  const card = thumb.closest(".card");
  if (card.classList.contains("playing")) return;
  card.classList.add("playing");
  if (thumb.dataset.video) {
    const video = document.createElement("video");
    Object.assign(video, { src: thumb.dataset.video, muted: true, loop: true, autoplay: true, playsInline: true });
    thumb.append(video);
  } else if (thumb.dataset.preview) {
    const image = thumb.querySelector("img");
    image.dataset.poster = image.src;
    image.src = thumb.dataset.preview;
  }
}

function stop(thumb) {
  const card = thumb.closest(".card");
  card.classList.remove("playing");
  thumb.querySelectorAll("video").forEach((video) => video.remove());
  const image = thumb.querySelector("img");
  if (image && image.dataset.poster) { image.src = image.dataset.poster; delete image.dataset.poster; }
}

for (const [on, off] of [["mouseover", "mouseout"], ["focusin", "focusout"]]) {
  document.addEventListener(on, (event) => {
    const thumb = event.target.closest && event.target.closest(".thumb");
    if (thumb) start(thumb);
  });
  document.addEventListener(off, (event) => {
    const thumb = event.target.closest && event.target.closest(".thumb");
    if (thumb && !thumb.contains(event.relatedTarget)) stop(thumb);
  });
}
