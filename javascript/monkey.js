// MONKEY: tooltips for the accordion's controls.
// The help texts come from the settings model; the Python side writes them into a hidden
// `.monkey-hints` element inside each accordion, so this file holds no copy of them.
(function () {
    "use strict";

    function root() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function nearestHinted(node, hints) {
        for (let current = node; current; current = current.parentElement) {
            if (current.id && Object.prototype.hasOwnProperty.call(hints, current.id)) {
                return current;
            }
        }
        return null;
    }

    // A title is MONKEY's to change only if it is empty or MONKEY set it (recorded in
    // data-monkey-title); the WebUI's hints.js and other extensions keep theirs.
    function setHint(node, text) {
        if (node.title && node.title !== node.getAttribute("data-monkey-title")) {
            return;
        }
        node.title = text;
        node.setAttribute("data-monkey-title", text);
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
                setHint(element, hints[id]);
                // The enabled hint sits on the accordion, which contains every other control:
                // a child takes the hint of its nearest hinted ancestor, whatever the key order.
                element.querySelectorAll("label, span, input, textarea").forEach(function (child) {
                    if (nearestHinted(child, hints) === element) {
                        setHint(child, hints[id]);
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
