// jobq dashboard: refresh <main> in place every data-refresh seconds (the page works
// without this script; it then reloads itself through a <noscript> meta refresh).
// Pauses while the tab is hidden; shows when the server stopped answering.
(function () {
  "use strict";
  document.documentElement.classList.add("js"); // lets tests tell the two modes apart
  var body = document.body;
  var seconds = parseFloat(body.getAttribute("data-refresh")) || 5;
  var queue = body.getAttribute("data-queue") || "0";
  var main = document.getElementById("main");
  var stamp = document.getElementById("updated");
  var state = document.getElementById("refresh-state");
  var busy = false;

  function refresh() {
    if (busy || document.hidden || !main) return;
    busy = true;
    fetch("/fragment?q=" + encodeURIComponent(queue), { cache: "no-store" })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text().then(function (html) {
          main.innerHTML = html;
          stamp.textContent = response.headers.get("X-Snapshot-Time") || stamp.textContent;
          state.textContent = "";
          state.className = "";
        });
      })
      .catch(function (err) {
        state.textContent = " · not updating (" + err.message + ")";
        state.className = "stale";
      })
      .then(function () { busy = false; });
  }

  setInterval(refresh, seconds * 1000);
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) refresh();
  });
})();
