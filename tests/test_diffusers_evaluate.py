"""``python -m monkey evaluate`` end to end: two tiny subjects × two prompts, three methods, with
tiny random CLIP and DINO models; its scores against an independent computation."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_diffusers_cli import exit_code
from test_diffusers_pipeline import reference
from tiny_pipeline import SIZE, SOURCE, text_config, tokenizer, write_model_files
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    ViTConfig,
    ViTModel,
)

from monkey.diffusers import evaluate as E
from monkey.diffusers.cli import main
from monkey.diffusers.scores import dino_pixels

SUBJECTS = {"dog6": "dog", "rc_car": "rc car"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    paths = write_model_files(folder)
    for seed, name in enumerate(SUBJECTS):
        (folder / "subjects" / name).mkdir(parents=True)
        reference(seed).save(folder / "subjects" / name / "00.png")
    paths["subjects"] = folder / "subjects"
    torch.manual_seed(0)
    tok = tokenizer(folder / "clip_tokenizer")
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    }
    clip = CLIPModel(
        CLIPConfig(
            text_config=text_config(len(tok)).to_dict(), vision_config=vision, projection_dim=16
        )
    )
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tok,
    )
    paths["clip"] = folder / "clip"
    clip.save_pretrained(paths["clip"])
    processor.save_pretrained(paths["clip"])
    dino = ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=224,
            patch_size=16,
        ),
        add_pooling_layer=False,
    )
    paths["dino"] = folder / "dino"
    dino.save_pretrained(paths["dino"])
    return paths


def argv(files, out: Path, *extra: str) -> list[str]:
    return [
        "evaluate",
        "--model",
        str(files["model"]),
        "--ip-adapter",
        str(files["ip_adapter"]),
        "--image-encoder",
        str(files["encoder"]),
        "--subjects",
        str(files["subjects"]),
        "--clip",
        str(files["clip"]),
        "--dino",
        str(files["dino"]),
        "--prompts",
        "2",
        "--width",
        str(SIZE),
        "--height",
        str(SIZE),
        "--layers",
        SOURCE,
        "--out",
        str(out),
        *extra,
    ]


def independent_scores(files, prompt: str, ref: Image.Image, image: Image.Image):
    """CLIP through its towers and projections by hand, DINO's CLS from our own crop."""
    model = CLIPModel.from_pretrained(files["clip"]).eval()
    pixels = CLIPImageProcessor.from_pretrained(files["clip"])(
        images=[ref, image], return_tensors="pt"
    ).pixel_values
    ids = CLIPTokenizer.from_pretrained(files["clip"])([prompt], return_tensors="pt").input_ids
    with torch.no_grad():
        seen = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        said = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    seen = seen / seen.norm(dim=-1, keepdim=True)
    said = said / said.norm(dim=-1, keepdim=True)
    dino = ViTModel.from_pretrained(files["dino"], add_pooling_layer=False).eval()
    crops = torch.stack([torch_crop(ref), torch_crop(image)])
    with torch.no_grad():
        cls = dino(pixel_values=crops).last_hidden_state[:, 0]
    cos = float(cls[0] @ cls[1] / (cls[0].norm() * cls[1].norm()))
    return float(said[0] @ seen[1]), float(seen[0] @ seen[1]), cos


def torch_crop(image: Image.Image) -> torch.Tensor:
    """Resize the shorter side to 256 (bicubic), centre-crop 224, ImageNet-normalise."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    other = int(256 * long / short)
    image = image.convert("RGB").resize((256, other) if w == short else (other, 256), 3)
    w, h = image.size
    x, y = round((w - 224) / 2), round((h - 224) / 2)
    array = torch.tensor(np.array(image.crop((x, y, x + 224, y + 224))), dtype=torch.float32)
    array = array.permute(2, 0, 1) / 255
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (array - mean) / std


def test_dino_crop_is_torchvisions_resize_256_centre_crop_224():
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (300, 410, 3), dtype=np.uint8)
    )
    assert dino_pixels(image).shape == (3, 224, 224)
    assert torch.allclose(dino_pixels(image), torch_crop(image), atol=1e-6)


def test_object_words_follow_the_paper():
    assert E.object_word("dog6") == "dog" and E.object_word("rc_car") == "rc car"
    assert len(E.LOCATION_PROMPTS) == 20 and E.LOCATION_PROMPTS[0] == " in the jungle"


def test_evaluate_end_to_end_and_resumes(files, tmp_path):
    out = tmp_path / "eval"
    assert main(argv(files, out)) == 0
    with (out / "scores.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(SUBJECTS) * 2 * 3
    keys = {(r["subject"], r["prompt_index"], r["method"]) for r in rows}
    assert len(keys) == len(rows)
    assert {r["method"] for r in rows} == {"monkey", "ip_1.0", "ip_0.5"}
    for row in rows:
        subject = row["subject"]
        assert row["prompt"] == SUBJECTS[subject] + E.LOCATION_PROMPTS[int(row["prompt_index"])]
        ref = Image.open(files["subjects"] / subject / "00.png").convert("RGB")
        image = Image.open(out / row["file"]).convert("RGB")
        expected = independent_scores(files, row["prompt"], ref, image)
        got = (float(row["clip_t"]), float(row["clip_i"]), float(row["dino"]))
        assert got == pytest.approx(expected, abs=2e-6)
    # MONKEY masked and differs from plain IP-Adapter at the same seed; scale 0.5 differs too
    by = {(r["subject"], r["prompt_index"], r["method"]): r for r in rows}
    for subject in SUBJECTS:
        monkey = by[(subject, "0", "monkey")]
        assert monkey["status"].startswith("masked")
        assert (out / monkey["file"].replace(".png", "-mask.png")).exists()
        pixels = {m: np.array(Image.open(out / by[(subject, "0", m)]["file"])) for m in E.METHODS}
        assert not np.array_equal(pixels["monkey"], pixels["ip_1.0"])
        assert not np.array_equal(pixels["ip_0.5"], pixels["ip_1.0"])

    summary = (out / "summary.md").read_text()
    for method in E.METHODS:
        clip_t = statistics.fmean(float(r["clip_t"]) for r in rows if r["method"] == method)
        line = next(line for line in summary.splitlines() if line.startswith(f"| {method} |"))
        assert f"| {method} | 4 | {clip_t:.4f} ± " in line
    with Image.open(out / "scatter.png") as plot:
        assert plot.size == (640, 480)
        colours = {tuple(c) for c in np.array(plot.convert("RGB")).reshape(-1, 3)}
    assert {(31, 119, 180), (255, 127, 14), (44, 160, 44)} <= colours
    record = json.loads((out / "settings.json").read_text())
    assert record["options"]["seed"] == 123 and record["options"]["steps"] == 8
    assert record["monkey"]["layers"] == [SOURCE] and record["monkey"]["threshold"] == 0.5
    assert record["prompts"] == list(E.LOCATION_PROMPTS[:2])
    assert set(record["versions"]) == {"monkey", "torch", "diffusers", "transformers"}

    # resumable: nothing is generated again; a lost image is generated (identically) again
    times = {r["file"]: (out / r["file"]).stat().st_mtime_ns for r in rows}
    lost = rows[4]["file"]
    lost_pixels = np.array(Image.open(out / lost))
    (out / lost).unlink()
    assert main(argv(files, out)) == 0
    after = E.read_scores(out / "scores.csv")
    assert len(after) == len(rows)
    for row in after:
        if row["file"] == lost:
            assert np.array_equal(np.array(Image.open(out / lost)), lost_pixels)
        else:
            assert (out / row["file"]).stat().st_mtime_ns == times[row["file"]]

    # another run's settings never mix into these scores
    with pytest.raises(SystemExit) as exit_info:
        main(argv(files, out, "--threshold", "0.3"))
    assert exit_info.value.code == 2


def test_evaluate_fails_clearly_on_bad_paths(files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(argv(dict(files, subjects=tmp_path / "none"), tmp_path / "out"))
    assert "--subjects not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(argv(dict(files, subjects=tmp_path / "empty"), tmp_path / "out"))
    assert "no images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv(dict(files, dino=tmp_path / "no-dino"), tmp_path / "out"))
    assert "--dino not found" in capsys.readouterr().err


def raw_rows(out: Path) -> list[dict[str, str]]:
    with (out / "scores.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def monkey_file(rows: list[dict[str, str]]) -> str:
    return next(r["file"] for r in rows if r["method"] == "monkey")


def test_evaluate_runs_never_lose_or_mix_results(files, tmp_path, capsys):
    out = tmp_path / "eval"
    quick = ("--steps", "4", "--prompts", "1", "--methods", "ip_0.5")
    # a run that fails at start-up does not lock its --out
    with pytest.raises(SystemExit) as exit_info:
        main(argv(files, out, *quick, "--layers", "nonsense"))
    assert exit_info.value.code == 2
    assert not (out / "settings.json").exists()
    assert main(argv(files, out, *quick)) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"wrote {out / 'scores.csv'} (2 images)")
    assert printed[1].startswith("ip_0.5: 2 images, CLIP-T ") and len(printed) == 2
    first = {r["file"]: (out / r["file"]).stat().st_mtime_ns for r in raw_rows(out)}

    # a mismatching run is refused, naming each option that differs and both values
    with pytest.raises(SystemExit) as exit_info:
        main(argv(files, out, *quick, "--threshold", "0.3", "--seed", "7"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--seed 123 there, 7 now" in error and "--threshold 0.5 there, 0.3 now" in error

    # the same model by another path is the same run: nothing is generated again
    other = dict(files, model=Path(str(files["model"]) + "/../" + files["model"].name))
    assert main(argv(other, out, *quick)) == 0
    assert {r["file"]: (out / r["file"]).stat().st_mtime_ns for r in raw_rows(out)} == first

    # more prompts and methods extend the run; what exists is not generated again
    extended = ("--steps", "4", "--prompts", "2", "--methods", "ip_0.5", "monkey")
    assert main(argv(files, out, *extended)) == 0
    rows = raw_rows(out)
    assert len(rows) == len(SUBJECTS) * 2 * 2
    assert all((out / f).stat().st_mtime_ns == t for f, t in first.items())
    record = json.loads((out / "settings.json").read_text())
    assert len(record["prompts"]) == 2 and set(record["methods"]) == {"ip_0.5", "monkey"}
    summary = (out / "summary.md").read_text()
    assert "| ip_0.5 | 4 |" in summary and "| monkey | 4 |" in summary
    # every image and mask says what was run
    with Image.open(out / monkey_file(rows)) as image:
        text = dict(image.text)
    assert text["Image"] == "monkey" and text["IP-Adapter scale"] == "1.0"
    assert text["Steps"] == "4" and text["Size"] == f"{SIZE}x{SIZE}" and text["CFG scale"] == "7.5"
    with Image.open(out / monkey_file(rows).replace(".png", "-mask.png")) as mask:
        assert mask.text["MONKEY status"].startswith("masked")

    # a lost image and a lost mask are made again, each keeping one row
    monkey_row = next(r for r in rows if r["method"] == "monkey")
    mask = out / monkey_row["file"].replace(".png", "-mask.png")
    mask.unlink()
    (out / rows[0]["file"]).unlink()
    capsys.readouterr()
    assert main(argv(files, out, "--steps", "4", "--prompts", "1")) == 0  # all three methods
    after = raw_rows(out)
    keys = [(r["subject"], r["prompt_index"], r["method"]) for r in after]
    assert len(keys) == len(set(keys)) == len(SUBJECTS) * (2 * 2 + 1)
    assert mask.exists() and (out / rows[0]["file"]).exists()
    assert len(capsys.readouterr().out.splitlines()) == 1 + 3  # where it wrote, one per method


def test_ctrl_c_in_evaluate_keeps_what_was_scored(files, tmp_path, capsys, monkeypatch):
    from monkey.diffusers.scores import Scorer

    score = Scorer.__call__
    calls = []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return score(self, *args)

    monkeypatch.setattr(Scorer, "__call__", interrupted)
    out = tmp_path / "eval"
    code = exit_code(argv(files, out, "--steps", "2", "--prompts", "1", "--methods", "ip_0.5"))
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"python -m monkey evaluate: interrupted; 1 scored image kept in {out / 'scores.csv'}; "
        "run the same command to resume"
    )
    assert len(raw_rows(out)) == 1 and (out / "settings.json").exists()
