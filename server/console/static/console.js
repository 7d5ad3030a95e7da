// lorafleet console: ask before any action form that carries data-confirm.
// Served from /static (the Content-Security-Policy allows no inline script).
"use strict";
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form.getAttribute && form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
