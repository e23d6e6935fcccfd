// MONKEY: tooltips for the accordion's controls.
// The help texts come from the settings model; the Python side writes them into a hidden
// `.monkey-hints` element inside each accordion, so this file holds no copy of them.
(function () {
    "use strict";

    function root() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function applyMonkeyHints() {
        const app = root();
        if (!app || !app.querySelectorAll) {
            return;
        }
        app.querySelectorAll(".monkey-hints:not([data-monkey-applied])").forEach(function (holder) {
            let hints;
            try {
                hints = JSON.parse(holder.getAttribute("data-hints") || "{}");
            } catch (error) {
                holder.setAttribute("data-monkey-applied", "invalid");
                return;
            }
            let missing = 0;
            Object.keys(hints).forEach(function (id) {
                const element = app.querySelector("#" + CSS.escape(id));
                if (!element) {
                    missing += 1;
                    return;
                }
                element.title = hints[id];
                element.querySelectorAll("label, span, input, textarea").forEach(function (child) {
                    if (!child.title) {
                        child.title = hints[id];
                    }
                });
            });
            if (missing === 0) {
                holder.setAttribute("data-monkey-applied", "1");
            }
        });
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(applyMonkeyHints);
    }
    if (typeof onUiUpdate === "function") {
        onUiUpdate(applyMonkeyHints);
    }
})();
