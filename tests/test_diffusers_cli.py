"""``python -m monkey generate`` on model files written to disk, loaded by the command itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_diffusers_pipeline import reference
from tiny_pipeline import SIZE, SOURCE, write_model_files

from monkey import args as A
from monkey.args import MonkeyArgs
from monkey.diffusers.cli import main
from monkey.diffusers.sheet import COLUMNS, MIN_CELL_WIDTH

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    paths = write_model_files(folder)
    paths["image"] = folder / "reference.png"
    reference().save(paths["image"])
    return paths


def argv(files, out: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--model",
        str(files["model"]),
        "--ip-adapter",
        str(files["ip_adapter"]),
        "--image-encoder",
        str(files["encoder"]),
        "--image",
        str(files["image"]),
        "--prompt",
        "a dog on the beach",
        "--steps",
        "8",
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


def test_generate_writes_images_masks_and_a_sheet_with_the_settings(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv(files, out, "--images", "2", "--threshold", "0.4", "--seed", "5")) == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    names = {
        f"monkey-{i}{suffix}.png" for i in (0, 1) for suffix in ("", "-mask", "-pass1", "-plain")
    }
    assert {path.name for path in written} == names | {"monkey-sheet.png"}
    assert sorted(p.name for p in out.iterdir()) == sorted(path.name for path in written)
    for path in written:
        with Image.open(path) as image:
            assert image.size == (SIZE, SIZE) or path.name == "monkey-sheet.png"
    mask = np.array(Image.open(out / "monkey-0-mask.png"))
    assert set(np.unique(mask)) <= {0, 255} and 0 < mask.mean() < 255
    with Image.open(out / "monkey-sheet.png") as sheet:
        assert sheet.size[0] == len(COLUMNS) * MIN_CELL_WIDTH
        assert sheet.size[1] > 2 * SIZE
        text = dict(sheet.text)
    settings = MonkeyArgs.from_infotext(text)
    assert settings == MonkeyArgs(enabled=True, threshold=0.4, layers=(SOURCE,))
    assert text["Seed"] == "5" and text["Steps"] == "8"
    assert text["parameters"].startswith("a dog on the beach\n")
    with Image.open(out / "monkey-0.png") as image:
        assert image.text[A.STATUS_LABEL].startswith("masked ")


def test_generate_without_plain_leaves_that_column_out(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv(files, out, "--no-plain", "--name", "x")) == 0
    names = {Path(line).name for line in capsys.readouterr().out.split()}
    assert names == {"x-0.png", "x-0-mask.png", "x-0-pass1.png", "x-sheet.png"}


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("model", "--model not found"),
        ("ip_adapter", "--ip-adapter not found"),
        ("encoder", "--image-encoder not found"),
        ("image", "--image not found"),
    ],
)
def test_missing_files_fail_clearly(files, tmp_path, capsys, key, message):
    broken = dict(files, **{key: tmp_path / "nowhere" / "missing.png"})
    with pytest.raises(SystemExit) as exit_info:
        main(argv(broken, tmp_path / "out"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "missing.png" in error
    assert "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_bad_settings_and_wrong_kinds_fail_clearly(files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv(files, tmp_path / "out", "--threshold", "1.5"))
    assert exit_info.value.code == 2
    assert "MONKEY setting 'threshold' got '1.5'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv(dict(files, image=files["encoder"]), tmp_path / "out"))
    assert "--image must be a file" in capsys.readouterr().err
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(SystemExit):
        main(argv(dict(files, image=not_an_image), tmp_path / "out"))
    assert "--image is not an image" in capsys.readouterr().err


def test_every_webui_independent_setting_is_a_flag():
    from monkey.diffusers.cli import build_parser
    from monkey.diffusers.options import WEBUI_ONLY

    given = "generate --model m --ip-adapter a --image-encoder e --image i --prompt p"
    options = build_parser().parse_args(given.split())
    for name in A.names():
        assert hasattr(options, f"monkey_{name}") is (name not in WEBUI_ONLY)


def test_python_dash_m_monkey_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "monkey", "generate", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--record-steps" in result.stdout and "--image-encoder" in result.stdout


def test_a_threshold_sweep_runs_pass_one_once_and_writes_every_value(
    files, tmp_path, capsys, monkeypatch
):
    from monkey.diffusers import pipeline

    runs = []
    real = pipeline.monkey_generate

    def spy(pipe, settings, **kwargs):
        out = real(pipe, settings, **kwargs)
        runs.append((settings.threshold, out.reused))
        return out

    monkeypatch.setattr(pipeline, "monkey_generate", spy)
    values = ["0.3", "0.4", "0.5", "0.6"]
    assert main(argv(files, tmp_path, "--no-plain", "--threshold", *values)) == 0
    assert runs == [(0.3, False), (0.4, True), (0.5, True), (0.6, True)]
    written = capsys.readouterr().out.split()
    for value in values:
        assert str(tmp_path / f"monkey-0-threshold{value}.png") in written
        mask = Image.open(tmp_path / f"monkey-0-threshold{value}-mask.png")
        assert mask.size == (SIZE, SIZE)
    masks = [np.array(Image.open(tmp_path / f"monkey-0-threshold{v}-mask.png")) for v in values]
    assert masks[0].mean() >= masks[-1].mean()  # a higher threshold keeps less
    grid = Image.open(tmp_path / "monkey-sheet.png")
    assert grid.width == max(SIZE, MIN_CELL_WIDTH) * (2 + 2 * len(values))
    info = Image.open(tmp_path / "monkey-0-threshold0.4.png").text
    assert info["MONKEY threshold"] == "0.4" and "pass 1 reused" in info["MONKEY status"]
