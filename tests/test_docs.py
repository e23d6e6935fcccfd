"""README documents every setting, and CI runs the README's test command."""

from __future__ import annotations

import json
import re
from pathlib import Path

from monkey import args as A

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_documented_with_name_key_and_position():
    rows = [line for line in README.splitlines() if re.match(r"\| \d+ \| `", line)]
    assert len(rows) == len(A.names())
    for index, (name, row) in enumerate(zip(A.names(), rows)):
        assert row.startswith(f"| {index} | `{name}` |"), row
        assert f"`{A.spec(name).label}`" in row
    assert "MONKEY version" in README and "MONKEY status" in README


def test_readme_examples_parse():
    blocks = re.findall(r"```json\n(.*?)```", README, flags=re.S)
    payloads = [json.loads(block) for block in blocks]
    requests = [p for p in payloads if "alwayson_scripts" in p]
    assert len(requests) >= 2  # the API section's and the several-subjects section's
    for request in requests:
        named = request["alwayson_scripts"]["MONKEY"]["args"][0]
        assert A.MonkeyArgs.from_dict(named).enabled
    several = next(r for r in requests if len(r["alwayson_scripts"]["ControlNet"]["args"]) > 1)
    assert A.MonkeyArgs.from_dict(several["alwayson_scripts"]["MONKEY"]["args"][0]).mask_mode == (
        "per_unit"
    )


def test_ci_runs_the_readme_test_command():
    command = "python -m pytest"
    assert f"\n{command}\n" in README
    assert any(line.strip() == command for line in (ROOT / ".ci" / "run").read_text().splitlines())
