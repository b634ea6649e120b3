// Progressive enhancement: the overview swaps in a fresh reading every data-refresh-s seconds. Without
// script the pages work the same, only the overview needs a reload.
"use strict";
(function () {
  const box = document.getElementById("overview");
  if (!box) return;
  const url = box.dataset.refreshUrl;
  const seconds = Math.max(1, Number(box.dataset.refreshS) || 5);
  async function refresh() {
    try {
      const response = await fetch(url, { headers: { Accept: "text/html" }, cache: "no-store" });
      if (response.ok) {
        const doc = new DOMParser().parseFromString(await response.text(), "text/html");
        const fresh = doc.getElementById("overview-body");
        if (fresh) box.replaceChildren(fresh);
      }
    } catch (err) {
      // The console or the network is away for a moment: keep the last reading, try again later.
    }
    setTimeout(refresh, seconds * 1000);
  }
  setTimeout(refresh, seconds * 1000);
})();
