"""javascript/monkey.js applies the model's help texts as tooltips, and is harmless without them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "javascript" / "monkey.js"

HARNESS = r"""
const fs = require("fs");
function el(id) { return { id, title: "", attrs: {}, children: [],
  querySelectorAll() { return this.children; },
  getAttribute(k) { return this.attrs[k]; }, setAttribute(k, v) { this.attrs[k] = v; } }; }
const label = el("label");
const slider = el("script_txt2img_monkey_threshold"); slider.children = [label];
const holder = el("hints"); holder.attrs["data-hints"] = process.argv[2];
const present = process.argv[3] === "1";
const app = {
  querySelectorAll(sel) { return present && !holder.attrs["data-monkey-applied"] ? [holder] : []; },
  querySelector(sel) { return sel === "#script_txt2img_monkey_threshold" ? slider : null; },
};
globalThis.CSS = { escape: (s) => s };
globalThis.gradioApp = () => app;
const hooks = [];
globalThis.onUiLoaded = (f) => hooks.push(f);
globalThis.onUiUpdate = (f) => hooks.push(f);
eval(fs.readFileSync(process.argv[1], "utf8"));
hooks.forEach((f) => f()); hooks.forEach((f) => f());
console.log(JSON.stringify({ slider: slider.title, label: label.title, applied: holder.attrs["data-monkey-applied"] || null }));
"""


def run(hints: dict, present: bool = True) -> dict:
    out = subprocess.run(
        ["node", "-e", HARNESS, str(SCRIPT), json.dumps(hints), "1" if present else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


def test_tooltips_come_from_the_hints_element():
    result = run({"script_txt2img_monkey_threshold": "Pixels at or above this are subject."})
    assert result == {
        "slider": "Pixels at or above this are subject.",
        "label": "Pixels at or above this are subject.",
        "applied": "1",
    }


def test_missing_elements_are_retried_and_absent_accordions_are_fine():
    assert run({"script_img2img_monkey_threshold": "x"})["applied"] is None
    assert run({}, present=False) == {"slider": "", "label": "", "applied": None}
