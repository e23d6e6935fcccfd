"""The paper's evaluation (METHOD.md §3.3): every subject image × the DreamBooth location prompts,
generated with MONKEY and with plain IP-Adapter at scale 1.0 and 0.5, scored with CLIP-T, CLIP-I
and DINO.

Writes, under ``--out``: ``images/`` (every generated image, MONKEY's masks), ``scores.csv``
(one row per generated image, appended as it is scored), ``summary.md`` (each method's means),
``scatter.png`` (CLIP-T vs CLIP-I, each method's mean marked) and ``settings.json`` (every
setting of the run and the library versions, written once the models have loaded and the first
image is scored, so a run that fails at start-up leaves its ``--out`` free). A rerun skips the
images already scored (and their masks), may add prompts and methods, and refuses, naming the
options, to mix runs whose settings differ; a model named by another path is the same model.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import need, open_image
from .options import (
    MonkeyCliError,
    Progress,
    call_kwargs,
    check_model_files,
    check_sampling,
    check_schedule,
    open_pipeline,
    resolve_device,
    run_params,
    settings_from,
)
from .runs import (
    COLUMNS,
    check_record,
    kept_rows,
    key,
    read_rows,
    read_scores,
    rewrite_scores,
    run_record,
    write_record,
)

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
    import torch
    import transformers

    from ..version import __version__

    return {
        "monkey": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def jobs(
    subjects: list[Subject], prompts: int, methods: list[str], done: set[tuple]
) -> Iterator[tuple[Subject, int, list[str]]]:
    for subject in subjects:
        for index in range(prompts):
            todo = [
                m for m in methods if key(subject.name, subject.image.name, index, m) not in done
            ]
            if todo:
                yield subject, index, todo


def write_settings(
    path: Path, record: dict[str, Any], saved: dict[str, Any] | None, options: argparse.Namespace
) -> dict[str, Any]:
    prompts = [LOCATION_PROMPTS[i] for i in range(options.prompts)]
    methods = {name: METHODS[name] for name in options.methods}
    return write_record(path, record, saved, prompts, methods, _versions())


def check_evaluate(options: argparse.Namespace) -> Any:
    """Everything ``evaluate`` can check before loading a model; its MONKEY settings."""
    from .checks import check_scorer

    settings = settings_from(options)
    if not 1 <= options.prompts <= len(LOCATION_PROMPTS):
        raise MonkeyCliError(f"--prompts: 1 to {len(LOCATION_PROMPTS)}, got {options.prompts}")
    check_sampling(options)
    find_subjects(need(options.subjects, "--subjects", "dir"), options.object)
    check_scorer(need(options.clip, "--clip", "dir"), "--clip")
    check_scorer(need(options.dino, "--dino", "dir"), "--dino")
    check_model_files(options)
    check_schedule(options)
    return settings


def run_evaluate(options: argparse.Namespace) -> int:
    from .pipeline import monkey_generate
    from .scores import Scorer
    from .sheet import save_png

    settings = check_evaluate(options)
    subjects = find_subjects(Path(options.subjects).expanduser(), options.object)
    out = Path(options.out)
    resolve_device(options)
    record = run_record(options, settings)
    settings_path = out / "settings.json"
    saved = check_record(settings_path, record)
    scores_path = out / "scores.csv"
    raw = read_rows(scores_path)
    rows = kept_rows(out, read_scores(scores_path))
    if len(rows) != len(raw):  # one row per image: drop duplicates and rows of lost images
        rewrite_scores(scores_path, rows)
    done = {key(r["subject"], r["image"], r["prompt_index"], r["method"]) for r in rows}
    todo = list(jobs(subjects, options.prompts, options.methods, done))
    scored = len(rows)
    options.kept = lambda: (
        f"{scored} scored image{'' if scored == 1 else 's'} kept in {scores_path}; "
        "run the same command to resume"
    )
    if todo:
        pipe = open_pipeline(options)
        scorer = Scorer(options.clip, options.dino, options.device)
        adapters = len(options.ip_adapter)
        progress = Progress()
        new_file = not scores_path.exists()
        out.mkdir(parents=True, exist_ok=True)
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
                        info = png_text(options, settings, pipe, prompt, method, status, image)
                        save_png(image, out / folder / name, info)
                        if mask is not None:
                            mask_name = f"{index:02d}-{method}-mask.png"
                            save_png(mask, out / folder / mask_name, info)
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
                        scored += 1
                        if saved is None:  # the models loaded and one image is scored
                            saved = write_settings(settings_path, record, saved, options)
            finally:
                progress.close()
    if saved is None and not scores_path.exists():
        return 0  # nothing to score and nothing scored: --out stays untouched
    methods = list(write_settings(settings_path, record, saved, options)["methods"])
    rows = read_scores(scores_path)
    (out / "summary.md").write_text(summary(rows, methods), encoding="utf-8")
    plot_scores(rows, methods).save(out / "scatter.png")
    report(out, rows, methods)
    return 0


def report(out: Path, rows: list[dict[str, str]], methods: list[str]) -> None:
    """Where the run wrote, and one line per method: images scored and the mean scores."""
    sys.stdout.write(
        f"wrote {out / 'scores.csv'} ({len(rows)} images), {out / 'summary.md'}, "
        f"{out / 'scatter.png'}, {out / 'images'}\n"
    )
    labels = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO"}
    for method in methods:
        stats = means(rows, method)
        if stats:
            scores = ", ".join(f"{labels[m]} {stats[m][0]:.4f}" for m in labels)
            sys.stdout.write(f"{method}: {stats['clip_t'][2]} images, {scores}\n")


def png_text(options, settings, pipe, prompt, method, status, image) -> Any:
    """An evaluation image's PNG text: every setting as run, its method and status."""
    from ..args import STATUS_LABEL
    from .sheet import png_info

    params = run_params(options, settings, pipe, image.size)
    params["IP-Adapter scale"] = METHODS[method]
    return png_info(prompt, {**params, "Image": method, STATUS_LABEL: status})


def _generate(pipe, monkey_generate, settings, method, kwargs, options, progress):
    """One image of ``method``: (image, status text, mask or None)."""
    import torch

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
