// Reloads the page when what it shows has changed (a new fractal, a render finished),
// by polling a small signature of the page. The page works without it.
(function () {
  "use strict";
  var body = document.body;
  var url = body.dataset.signatureUrl;
  var shown = body.dataset.signature;
  if (!url || !window.fetch) {
    return;
  }
  setInterval(function () {
    fetch(url, { cache: "no-store" })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (signature) {
        if (signature !== null && signature.trim() !== shown) {
          window.location.reload();
        }
      })
      .catch(function () { /* The server is away; try again at the next tick. */ });
  }, 2000);
})();
