// Typeset the math that pymdownx.arithmatex (generic mode) leaves in elements of class
// "arithmatex": \( ... \) inline, \[ ... \] or a bare \begin{...} environment as a block.
// KaTeX is served from this site (assets/katex), so pages need no network access.
(function () {
  "use strict";

  function strip(tex, open, close) {
    return tex.startsWith(open) && tex.endsWith(close)
      ? tex.slice(open.length, tex.length - close.length)
      : null;
  }

  function typeset(root) {
    root.querySelectorAll(".arithmatex").forEach(function (element) {
      if (element.querySelector(".katex")) {
        return; // already typeset
      }
      var source = element.textContent.trim();
      var inline = strip(source, "\\(", "\\)");
      var block = inline === null ? strip(source, "\\[", "\\]") : null;
      var tex = inline !== null ? inline : block !== null ? block : source;
      katex.render(tex, element, {
        displayMode: inline === null && element.tagName !== "SPAN",
        throwOnError: false,
      });
    });
  }

  if (typeof document$ !== "undefined") {
    // Material for MkDocs: runs for the first page and after every instant navigation.
    document$.subscribe(function () {
      typeset(document);
    });
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () {
      typeset(document);
    });
  } else {
    typeset(document);
  }
})();
