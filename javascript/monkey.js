// MONKEY: tooltips for the accordion's controls, and the mask preview redrawn after a generation.
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

    // After a generation that kept pass-1 maps (its infotext names them), redraw the accordion's
    // mask preview as a slider move would, so the new attention map shows without a click.
    const seenInfo = {};
    function refreshMaskPreviews() {
        const app = root();
        if (!app || !app.querySelector) {
            return;
        }
        ["txt2img", "img2img"].forEach(function (tab) {
            const info = app.querySelector("#html_info_" + tab);
            const button = app.querySelector("#script_" + tab + "_monkey_mask_preview_refresh");
            if (!info || !button) {
                return;
            }
            const text = info.textContent || "";
            if (seenInfo[tab] === undefined) {
                seenInfo[tab] = text; // the page's first state is no new generation
                return;
            }
            if (text === seenInfo[tab]) {
                return;
            }
            seenInfo[tab] = text;
            if (text.indexOf("MONKEY maps:") >= 0) {
                button.click();
            }
        });
    }

    function onUpdate() {
        applyMonkeyHints();
        refreshMaskPreviews();
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(onUpdate);
    }
    if (typeof onUiUpdate === "function") {
        onUiUpdate(onUpdate);
    }
})();
