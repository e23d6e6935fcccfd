"""What an evaluation's ``--out`` holds besides images: ``settings.json`` (the run's record) and
``scores.csv`` (one row per image), and the rules that keep runs from mixing or losing results.

A run is identified by every option that decides its images and scores, paths resolved (another
path to the same model is the same run); ``--prompts`` and ``--methods`` may grow between
invocations. scores.csv holds exactly one row per image on disk: rows of lost images (or lost
MONKEY masks) are dropped before they are generated again.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from .options import MonkeyCliError

COLUMNS = (
    "subject",
    "object",
    "image",
    "prompt_index",
    "prompt",
    "method",
    "seed",
    "clip_t",
    "clip_i",
    "dino",
    "file",
    "status",
)
PATHS = ("model", "config", "ip_adapter", "image_encoder", "subjects", "clip", "dino")
"""Options that are paths: recorded resolved, so another path to the same file is the same run."""
EXTENDABLE = ("prompts", "methods")
"""Options a rerun may change: it adds their images to the run (settings.json keeps the union)."""
NOT_RECORDED = ("run", "out", "command", "verbose", "kept", *EXTENDABLE)


def _resolved(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_resolved(item) for item in value]
    return str(Path(value).expanduser().resolve())


def run_record(options: argparse.Namespace, settings: Any) -> dict[str, Any]:
    """Everything that decides each image and its scores (not where they are written, nor which
    prompts and methods this invocation adds)."""
    from dataclasses import asdict

    cli = {
        key: _resolved(value) if key in PATHS else value
        for key, value in vars(options).items()
        if key not in NOT_RECORDED and not key.startswith("monkey_")
    }
    return {
        "protocol": "METHOD.md 3.3: CLIP-T, CLIP-I (ViT-B/32), DINO (ViT-S/16 CLS, 256/224)",
        "options": dict(sorted(cli.items())),
        "monkey": {
            key: list(v) if isinstance(v, tuple) else v for key, v in asdict(settings).items()
        },
    }


def _identity(saved: dict[str, Any]) -> dict[str, Any]:
    """A settings.json's run record, paths resolved (older files recorded them as given)."""
    options = {
        key: _resolved(value) if key in PATHS else value
        for key, value in saved.get("options", {}).items()
        if key not in NOT_RECORDED
    }
    return {
        "protocol": saved.get("protocol"),
        "options": dict(sorted(options.items())),
        "monkey": saved.get("monkey"),
    }


def check_record(path: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """The saved settings.json, refused in one line naming each option that differs."""
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise MonkeyCliError(f"--out: {path} is not a settings file ({error})") from None
    old = _identity(saved)
    if old == record:
        return saved
    changed = []
    for group in ("options", "monkey"):
        before, now = old.get(group) or {}, record[group]
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                changed.append(
                    f"--{key.replace('_', '-')} {_shown(before.get(key))} there, "
                    f"{_shown(now.get(key))} now"
                )
    if old.get("protocol") != record["protocol"]:
        changed.append("the scoring protocol")
    raise MonkeyCliError(
        f"--out {path.parent} holds a run with other settings ({'; '.join(changed)}): "
        "use the same options to resume it, or another --out to keep both"
    )


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) or "(none)"
    return "(unset)" if value is None else str(value)


def write_record(
    path: Path,
    record: dict[str, Any],
    saved: dict[str, Any] | None,
    prompts: list[str],
    methods: dict[str, float],
    versions: dict[str, str],
) -> dict[str, Any]:
    """settings.json: the run record, the prompts and methods scored so far (the union of every
    invocation with the earlier ones in ``saved``) and the library versions."""
    before = (saved or {}).get("prompts", [])
    union = dict((saved or {}).get("methods", {}))
    union.update((name, scale) for name, scale in methods.items() if name not in union)
    text = {
        **record,
        "prompts": prompts if len(prompts) >= len(before) else before,
        "methods": union,
        "versions": versions,
    }
    path.write_text(json.dumps(text, indent=2), encoding="utf-8")
    return text


def read_scores(path: Path) -> list[dict[str, str]]:
    """The scored rows, the latest per (subject, image, prompt, method): an image generated again
    after its file was lost replaces its old row."""
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        latest = {
            key(r["subject"], r["image"], r["prompt_index"], r["method"]): r
            for r in csv.DictReader(handle)
        }
    return list(latest.values())


def key(subject: str, image: str, prompt_index: int | str, method: str) -> tuple:
    return (subject, image, int(prompt_index), method)


def kept_rows(out: Path, rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Rows whose image (and, for MONKEY, mask) is still on disk: the rest are generated again."""
    kept = []
    for row in rows:
        image = out / row["file"]
        mask = image.with_name(image.stem + "-mask.png")
        if image.exists() and (row["method"] != "monkey" or mask.exists()):
            kept.append(row)
    return kept


def rewrite_scores(path: Path, rows: list[dict[str, str]]) -> None:
    """scores.csv holding exactly ``rows`` (written beside it, then moved over it)."""
    partial = path.with_suffix(".csv.partial")
    with partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: row.get(key, "") for key in COLUMNS} for row in rows)
    partial.replace(path)


def read_rows(path: Path) -> list[dict[str, str]]:
    """scores.csv as written, duplicates included."""
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))
