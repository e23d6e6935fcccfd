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


def _steps(cell: str) -> list[int]:
    """``1, 2`` or ``7–22`` (both ends included) as README's step tables write them."""
    if "–" in cell:
        first, last = (int(part) for part in cell.split("–"))
        return list(range(first, last + 1))
    return [int(part) for part in cell.split(",")]


def _run(cell: str, n: int) -> int:
    match = re.fullmatch(r"(\d+) \((\d+\.\d\d)×\)", cell)
    assert match, cell
    assert match.group(2) == f"{int(match.group(1)) / n:.2f}", cell
    return int(match.group(1))


def test_the_step_table_is_what_monkey_does():
    """README's *Steps* table: pass-1 length, recorded and masked steps, and the steps run (pass 1
    up to its last recorded step, then all of pass 2) for both pass-1 settings."""
    from monkey.steps import StepPlan, pass1_length

    section = README[README.index("#### Steps") : README.index("Steps are **sampler steps")]
    rows = [line for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    defaults = A.MonkeyArgs()
    seen = []
    for row in rows:
        n, length, recorded, masked, run, fixed = (
            cell.strip() for cell in row.strip("|").split("|")
        )
        n = int(n)
        seen.append(n)
        first = pass1_length(n, defaults.pass1_steps)
        plan = StepPlan.for_settings(first, defaults)
        assert int(length) == first, row
        assert _steps(recorded) == list(plan.record), row
        assert _steps(masked) == list(StepPlan.for_settings(n, defaults).apply), row
        assert _run(run, n) == plan.last_record + 1 + n, row
        four = StepPlan.for_settings(pass1_length(n, 4), defaults)
        assert _run(fixed, n) == four.last_record + 1 + n, row
    assert seen == [4, 6, 8, 20, 30, 50]
