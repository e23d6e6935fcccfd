"""javascript/monkey.js applies the model's help texts as tooltips, and is harmless without them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "javascript" / "monkey.js"

# A fake DOM shaped like the WebUI's: the InputAccordion itself carries the `enabled` id and
# contains the other controls, so a script that only looks at its own control's children
# cannot pass. querySelectorAll returns matching descendants in document order, as the real
# DOM does; selectors it does not understand throw rather than silently match nothing.
HARNESS = r"""
const fs = require("fs");
const config = JSON.parse(process.argv[2]);
const named = {};
function matches(node, selector) {
  return selector.split(",").some((part) => {
    const m = /^([a-z-]+)?(?:#([\w-]+))?(?:\.([\w-]+))?(?::not\(\[([\w-]+)\]\))?$/.exec(part.trim());
    if (!m) throw new Error("fake DOM cannot match " + part);
    const [, tag, id, cls, notAttr] = m;
    return (!tag || node.tagName === tag.toUpperCase()) && (!id || node.id === id)
      && (!cls || node.classes.includes(cls)) && (!notAttr || !(notAttr in node.attrs));
  });
}
function el(name, tag, opts, children) {
  const node = { name, tagName: tag.toUpperCase(), id: (opts && opts.id) || "",
    classes: (opts && opts.classes) || [], attrs: {}, children: children || [], parentElement: null,
    get title() { return this.attrs.title || ""; },
    set title(v) { this.attrs.title = String(v); },
    getAttribute(k) { return k in this.attrs ? this.attrs[k] : null; },
    setAttribute(k, v) { this.attrs[k] = String(v); },
    querySelectorAll(selector) {
      const found = [];
      (function walk(n) { n.children.forEach((c) => { if (matches(c, selector)) found.push(c); walk(c); }); })(this);
      return found;
    },
    querySelector(selector) { return this.querySelectorAll(selector)[0] || null; },
  };
  node.children.forEach((c) => { c.parentElement = node; });
  named[name] = node;
  return node;
}
const holder = el("holder", "div", { classes: ["monkey-hints"] });
holder.attrs["data-hints"] = JSON.stringify(config.hints);
const accordion = el("accordion", "div", { id: "script_txt2img_monkey_enabled", classes: ["input-accordion"] }, [
  el("header", "label", {}, [el("header.span", "span"), el("header.input", "input")]),
  el("row", "div", {}, [
    el("threshold", "div", { id: "script_txt2img_monkey_threshold" }, [
      el("threshold.label", "label", {}, [el("threshold.span", "span")]),
      el("threshold.input", "input"),
    ]),
    el("thresholds", "div", { id: "script_txt2img_monkey_thresholds" }, [
      el("thresholds.label", "label", {}, [el("thresholds.span", "span"), el("thresholds.textarea", "textarea")]),
    ]),
  ]),
  holder,
]);
const app = el("app", "div", {}, config.present ? [accordion] : []);
Object.entries(config.foreign || {}).forEach(([name, title]) => { named[name].title = title; });
Object.entries(config.earlier || {}).forEach(([name, title]) => {
  named[name].title = title; named[name].setAttribute("data-monkey-title", title);
});
globalThis.CSS = { escape: (s) => s };
globalThis.gradioApp = () => app;
const hooks = [];
globalThis.onUiLoaded = (f) => hooks.push(f);
globalThis.onUiUpdate = (f) => hooks.push(f);
eval(fs.readFileSync(process.argv[1], "utf8"));
hooks.forEach((f) => f()); hooks.forEach((f) => f());
const titles = {};
Object.values(named).forEach((n) => { if (n !== holder) titles[n.name] = n.title; });
console.log(JSON.stringify({ titles, applied: holder.getAttribute("data-monkey-applied") }));
"""

ENABLED = "script_txt2img_monkey_enabled"
THRESHOLD = "script_txt2img_monkey_threshold"
THRESHOLDS = "script_txt2img_monkey_thresholds"
HINTS = {
    ENABLED: "Run MONKEY's two passes on the IP-Adapter units.",
    THRESHOLD: "Pixels at or above this are subject.",
    THRESHOLDS: "One threshold per image.",
}
OWNER = {  # each fake element -> the hinted control whose help it must show
    "accordion": ENABLED,
    "header": ENABLED,
    "header.span": ENABLED,
    "header.input": ENABLED,
    "threshold": THRESHOLD,
    "threshold.label": THRESHOLD,
    "threshold.span": THRESHOLD,
    "threshold.input": THRESHOLD,
    "thresholds": THRESHOLDS,
    "thresholds.label": THRESHOLDS,
    "thresholds.span": THRESHOLDS,
    "thresholds.textarea": THRESHOLDS,
}


def run(
    hints: dict, present: bool = True, foreign: dict | None = None, earlier: dict | None = None
) -> dict:
    """``foreign``: titles another source set first; ``earlier``: titles MONKEY set before."""
    config = {
        "hints": hints,
        "present": present,
        "foreign": foreign or {},
        "earlier": earlier or {},
    }
    return node(HARNESS, config)


def node(harness: str, argument: object) -> object:
    """Run ``harness`` in node with monkey.js's path and ``argument`` (JSON); its JSON output."""
    out = subprocess.run(
        ["node", "-e", harness, str(SCRIPT), json.dumps(argument)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


def test_tooltips_come_from_the_hints_element():
    result = run({THRESHOLD: HINTS[THRESHOLD]})
    assert result["applied"] == "1"
    for name in ("threshold", "threshold.label", "threshold.span", "threshold.input"):
        assert result["titles"][name] == HINTS[THRESHOLD]
    assert result["titles"]["thresholds.textarea"] == ""


def test_missing_elements_are_retried_and_absent_accordions_are_fine():
    assert run({"script_img2img_monkey_threshold": "x"})["applied"] is None
    result = run({}, present=False)
    assert result["applied"] is None
    assert not any(result["titles"].values())


@pytest.mark.parametrize("order", ["outer_first", "outer_last"])
def test_each_control_shows_its_own_hint_inside_the_accordion(order):
    hints = dict(HINTS) if order == "outer_first" else dict(reversed(HINTS.items()))
    result = run(hints)
    assert result["applied"] == "1"
    assert result["titles"] == {"app": "", "row": "", **{k: HINTS[v] for k, v in OWNER.items()}}


def test_titles_set_by_others_are_kept():
    foreign = {"thresholds.textarea": "from another extension", "header.span": "from the WebUI"}
    result = run(HINTS, foreign=foreign)
    for name, title in foreign.items():
        assert result["titles"][name] == title
    assert result["titles"]["thresholds.span"] == HINTS[THRESHOLDS]


def test_titles_monkey_set_before_are_corrected():
    result = run(HINTS, earlier={"threshold.span": HINTS[ENABLED], "thresholds": "old help"})
    assert result["titles"]["threshold.span"] == HINTS[THRESHOLD]
    assert result["titles"]["thresholds"] == HINTS[THRESHOLDS]


# The preview's refresh: a page holding the txt2img infotext and the preview's refresh button;
# each step sets the infotext, then runs the WebUI's update callbacks once.
REFRESH = r"""
const fs = require("fs");
const steps = JSON.parse(process.argv[2]);
let clicks = 0;
const info = { id: "html_info_txt2img", textContent: "" };
const button = { id: "script_txt2img_monkey_mask_preview_refresh", click() { clicks += 1; } };
const app = {
  querySelector(selector) {
    return [info, button].find((n) => selector === "#" + n.id) || null;
  },
  querySelectorAll() { return []; },
};
globalThis.CSS = { escape: (s) => s };
globalThis.gradioApp = () => app;
const hooks = [];
globalThis.onUiLoaded = (f) => hooks.push(f);
globalThis.onUiUpdate = (f) => hooks.push(f);
eval(fs.readFileSync(process.argv[1], "utf8"));
const seen = steps.map((text) => { info.textContent = text; hooks.forEach((f) => f()); return clicks; });
console.log(JSON.stringify(seen));
"""


def refresh_clicks(steps: list[str]) -> list[int]:
    return node(REFRESH, steps)


def test_a_generation_that_kept_maps_redraws_the_preview_once():
    kept = "a dog, Steps: 8, MONKEY status: masked, MONKEY maps: 0123abcd"
    other = "a dog, Steps: 8, MONKEY maps: 4567ef01"
    plain = "a dog, Steps: 8"
    # the page's first state is no generation; a new infotext with maps clicks once, the same
    # infotext again (any later UI update) does not, one without maps (MONKEY off) does not
    assert refresh_clicks(["", kept, kept, plain, other, other]) == [0, 1, 1, 1, 2, 2]
    assert refresh_clicks([kept]) == [0]
