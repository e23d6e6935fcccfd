"""The paper's evaluation (METHOD.md §3.3): every subject image × the DreamBooth location prompts,
generated with MONKEY and with plain IP-Adapter at scale 1.0 and 0.5, scored with CLIP-T, CLIP-I
and DINO.

Writes, under ``--out``: ``images/`` (every generated image, MONKEY's masks), ``scores.csv``
(one row per generated image, appended as it is scored), ``summary.md`` (each method's means),
``scatter.png`` (CLIP-T vs CLIP-I, each method's mean marked) and ``settings.json`` (every
setting of the run and the library versions). A rerun skips the images already scored, and
refuses to mix runs whose settings differ.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .files import need, open_image
from .options import MonkeyCliError, Progress, call_kwargs, open_pipeline, settings_from

LOCATION_PROMPTS = (
    " in the jungle",
    " in the snow",
    " on the beach",
    " on a cobblestone street",
    " on top of pink fabric",
    " on top of a wooden floor",
    " with a city in the background",
    " with a mountain in the background",
    " with a blue house in the background",
    " on top of a purple rug in a forest",
    " with a wheat field in the background",
    " with a tree and autumn leaves in the background",
    " with the Eiffel Tower in the background",
    " floating on top of water",
    " floating in an ocean of milk",
    " on top of green grass with sunflowers around it",
    " on top of a mirror",
    " on top of the sidewalk in a crowded street",
    " on top of a dirt road",
    " on top of a white rug",
)
"""DreamBooth's 20 recontextualisation prompts, as the paper's code appends them to the object."""

METHODS = {"monkey": 1.0, "ip_1.0": 1.0, "ip_0.5": 0.5}
"""Method -> IP-Adapter scale; ``monkey`` is MONKEY at that scale, the others plain IP-Adapter."""

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
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Subject:
    name: str
    object: str
    """The class word put before each location prompt ("dog", "backpack")."""
    image: Path


def object_word(name: str) -> str:
    """DreamBooth's folder name as the paper's code turns it into the object: digits dropped,
    underscores as spaces (``dog6`` -> ``dog``, ``rc_car`` -> ``rc car``)."""
    return re.sub(r"\s+", " ", re.sub(r"\d", "", name).replace("_", " ")).strip() or name


def find_subjects(folder: Path, object_override: str | None = None) -> list[Subject]:
    """``folder/<subject>/<image>`` (DreamBooth's layout) or images directly in ``folder``."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            for image in sorted(path.iterdir()):
                if image.suffix.lower() in IMAGE_SUFFIXES:
                    found.append(
                        Subject(path.name, object_override or object_word(path.name), image)
                    )
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(Subject(path.stem, object_override or object_word(path.stem), path))
    if not found:
        raise MonkeyCliError(f"--subjects: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return found


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--subjects", required=True, help="folder of <subject>/<image> files")
    group.add_argument("--clip", required=True, help="CLIP ViT-B/32 folder (model + processor)")
    group.add_argument("--dino", required=True, help="DINO ViT-S/16 folder")
    group.add_argument("--out", default="outputs/monkey-eval", help="output folder")
    group.add_argument(
        "--prompts", type=int, default=len(LOCATION_PROMPTS), help="use the first N prompts"
    )
    group.add_argument("--object", default=None, help="object word for every subject")
    group.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.set_defaults(run=run_evaluate)


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    from ..version import __version__

    return {
        "monkey": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def run_record(options: argparse.Namespace, settings: Any) -> dict[str, Any]:
    """Everything that decides the images and scores (not where they are written)."""
    from dataclasses import asdict

    cli = {
        key: value
        for key, value in vars(options).items()
        if key not in ("run", "out", "command") and not key.startswith("monkey_")
    }
    return {
        "protocol": "METHOD.md 3.3: CLIP-T, CLIP-I (ViT-B/32), DINO (ViT-S/16 CLS, 256/224)",
        "prompts": [LOCATION_PROMPTS[i] for i in range(options.prompts)],
        "methods": {name: METHODS[name] for name in options.methods},
        "options": dict(sorted(cli.items())),
        "monkey": {
            key: list(v) if isinstance(v, tuple) else v for key, v in asdict(settings).items()
        },
    }


def _check_record(path: Path, record: dict[str, Any]) -> None:
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        old_run = {key: value for key, value in old.items() if key != "versions"}
        if old_run != record:
            changed = sorted(
                k for k in set(old_run) | set(record) if old_run.get(k) != record.get(k)
            )
            raise MonkeyCliError(
                f"{path} records a run with other settings ({', '.join(changed)}); "
                "use another --out to keep both"
            )


def read_scores(path: Path) -> list[dict[str, str]]:
    """The scored rows, the latest per (subject, image, prompt, method): an image generated again
    after its file was lost replaces its old row."""
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        latest = {
            _key(r["subject"], r["image"], r["prompt_index"], r["method"]): r
            for r in csv.DictReader(handle)
        }
    return list(latest.values())


def _key(subject: str, image: str, prompt_index: int | str, method: str) -> tuple:
    return (subject, image, int(prompt_index), method)


def jobs(
    subjects: list[Subject], prompts: int, methods: list[str], done: set[tuple]
) -> Iterator[tuple[Subject, int, list[str]]]:
    for subject in subjects:
        for index in range(prompts):
            todo = [
                m for m in methods if _key(subject.name, subject.image.name, index, m) not in done
            ]
            if todo:
                yield subject, index, todo


def run_evaluate(options: argparse.Namespace) -> int:
    from .pipeline import monkey_generate
    from .scores import Scorer

    if not 1 <= options.prompts <= len(LOCATION_PROMPTS):
        raise MonkeyCliError(f"--prompts: 1 to {len(LOCATION_PROMPTS)}, got {options.prompts}")
    settings = settings_from(options)
    subjects = find_subjects(need(options.subjects, "--subjects", "dir"), options.object)
    clip = need(options.clip, "--clip", "dir")
    dino = need(options.dino, "--dino", "dir")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    record = run_record(options, settings)
    _check_record(out / "settings.json", record)
    (out / "settings.json").write_text(
        json.dumps({**record, "versions": _versions()}, indent=2), encoding="utf-8"
    )
    scores_path = out / "scores.csv"
    rows = read_scores(scores_path)
    done = {
        _key(r["subject"], r["image"], r["prompt_index"], r["method"])
        for r in rows
        if (out / r["file"]).exists()
    }
    todo = list(jobs(subjects, options.prompts, options.methods, done))
    if todo:
        pipe = open_pipeline(options)
        scorer = Scorer(clip, dino, options.device)
        adapters = len(options.ip_adapter)
        progress = Progress()
        new_file = not scores_path.exists()
        with scores_path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            if new_file:
                writer.writeheader()
            try:
                for subject, index, methods in todo:
                    reference = open_image(subject.image, "--subjects image")
                    prompt = subject.object + LOCATION_PROMPTS[index]
                    kwargs = call_kwargs(options, prompt, [reference] * adapters)
                    for method in methods:
                        row = _generate(
                            pipe, monkey_generate, settings, method, kwargs, options, progress
                        )
                        image, status, mask = row
                        folder = Path("images") / subject.name / subject.image.stem
                        name = f"{index:02d}-{method}.png"
                        (out / folder).mkdir(parents=True, exist_ok=True)
                        image.save(out / folder / name)
                        if mask is not None:
                            mask.save(out / folder / f"{index:02d}-{method}-mask.png")
                        scores = scorer(prompt, reference, image)
                        writer.writerow(
                            {
                                "subject": subject.name,
                                "object": subject.object,
                                "image": subject.image.name,
                                "prompt_index": index,
                                "prompt": prompt,
                                "method": method,
                                "seed": options.seed,
                                "clip_t": f"{scores.clip_t:.6f}",
                                "clip_i": f"{scores.clip_i:.6f}",
                                "dino": f"{scores.dino:.6f}",
                                "file": (folder / name).as_posix(),
                                "status": status,
                            }
                        )
                        handle.flush()
            finally:
                progress.close()
    rows = read_scores(scores_path)
    (out / "summary.md").write_text(summary(rows, options.methods), encoding="utf-8")
    plot_scores(rows, options.methods).save(out / "scatter.png")
    return 0


def _generate(pipe, monkey_generate, settings, method, kwargs, options, progress):
    """One image of ``method``: (image, status text, mask or None)."""
    adapters = len(options.ip_adapter)
    pipe.set_ip_adapter_scale([METHODS[method]] * adapters)
    generator = torch.Generator().manual_seed(options.seed)
    if method == "monkey":
        result = monkey_generate(pipe, settings, progress=progress, **kwargs, generator=generator)
        return result.images[0], result.statuses[0], result.masks[0]
    images = pipe(
        **kwargs, generator=generator, callback_on_step_end=progress.callback(method)
    ).images
    return images[0], f"plain IP-Adapter at scale {METHODS[method]}", None


def means(rows: list[dict[str, str]], method: str) -> dict[str, tuple[float, float, int]]:
    """metric -> (mean, standard deviation, count) over ``method``'s rows."""
    picked = [r for r in rows if r["method"] == method]
    out = {}
    for metric in ("clip_t", "clip_i", "dino"):
        values = [float(r[metric]) for r in picked]
        if values:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            out[metric] = (statistics.fmean(values), spread, len(values))
    return out


def summary(rows: list[dict[str, str]], methods: list[str]) -> str:
    lines = [
        "# MONKEY evaluation",
        "",
        "Means over every (subject image, location prompt) pair, ± one standard deviation.",
        "",
        "| method | images | CLIP-T | CLIP-I | DINO |",
        "|---|---|---|---|---|",
    ]
    for method in methods:
        stats = means(rows, method)
        if not stats:
            continue
        cells = [f"{stats[m][0]:.4f} ± {stats[m][1]:.4f}" for m in ("clip_t", "clip_i", "dino")]
        lines.append(f"| {method} | {stats['clip_t'][2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_scores(rows: list[dict[str, str]], methods: list[str]):
    from .scatter import scatter

    return scatter(
        {
            method: [
                (float(r["clip_t"]), float(r["clip_i"])) for r in rows if r["method"] == method
            ]
            for method in methods
        }
    )
