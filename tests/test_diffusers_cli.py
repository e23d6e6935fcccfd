"""``python -m monkey generate`` on model files written to disk, loaded by the command itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_diffusers_pipeline import reference
from tiny_pipeline import SIZE, SOURCE

from monkey import args as A
from monkey.args import MonkeyArgs
from monkey.diffusers.cli import main
from monkey.diffusers.sheet import COLUMNS, MIN_CELL_WIDTH

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(user_folder):
    """The session's model files (conftest's ``user_folder``), with this module's reference."""
    paths = {
        "model": user_folder / "sd15",
        "encoder": user_folder / "image_encoder",
        "ip_adapter": user_folder / "ip-adapter_sd15.safetensors",
        "image": user_folder / "reference.png",
    }
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


def written_names(capsys) -> set[str]:
    return {Path(line).name for line in capsys.readouterr().out.split()}


def test_an_out_holding_a_run_is_refused_and_overwrite_replaces_that_run(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv(files, out, "--images", "2", "--steps", "4")) == 0
    first = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(argv(files, out, "--steps", "4"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "--out" in error and "'monkey'" in error and "--overwrite" in error
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "notes.txt"} == first
    # --overwrite: the earlier run's files go (monkey-1-* too), other files stay
    assert main(argv(files, out, "--steps", "4", "--overwrite")) == 0
    names = written_names(capsys)
    assert {p.name for p in out.iterdir()} == names | {"notes.txt"}
    assert not any(name.startswith("monkey-1") for name in names)
    # another --name writes beside it
    assert main(argv(files, out, "--steps", "4", "--name", "other", "--no-plain")) == 0
    assert {p.name for p in out.iterdir()} >= names | written_names(capsys)


def test_every_png_carries_what_was_run(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv(files, out, "--steps", "4", "--scheduler", "ddim")) == 0
    kinds = {}
    for path in sorted(out.iterdir()):
        with Image.open(path) as image:
            text = dict(image.text)
        assert text["parameters"].startswith("a dog on the beach\n"), path.name
        assert text["CFG scale"] == "7.5"  # the pipeline's default, as run
        assert text["Size"] == f"{SIZE}x{SIZE}" and text["Steps"] == "4"
        assert text["Scheduler"] == "ddim (DDIMScheduler)"
        assert MonkeyArgs.from_infotext(text).layers == (SOURCE,)
        kinds[path.name] = text["Image"]
    assert kinds == {
        "monkey-0.png": "MONKEY",
        "monkey-0-mask.png": "mask",
        "monkey-0-pass1.png": "MONKEY pass 1",
        "monkey-0-plain.png": "plain IP-Adapter",
        "monkey-sheet.png": "sheet",
    }


def without_size(arguments: list[str]) -> list[str]:
    out = list(arguments)
    for flag in ("--width", "--height"):
        index = out.index(flag)
        del out[index : index + 2]
    return out


def test_img2img_takes_the_init_images_size_or_resizes_it(files, tmp_path, capsys):
    init = tmp_path / "room.png"
    Image.new("RGB", (96, 64), "gray").save(init)
    extra = ("--init-image", str(init), "--strength", "0.5", "--steps", "4", "--no-plain")
    out = tmp_path / "own"
    assert main(without_size(argv(files, out, *extra))) == 0
    with Image.open(out / "monkey-0.png") as image:
        assert image.size == (96, 64)
        assert image.text["Size"] == "96x64" and image.text["Size from"] == "the init image"
        assert image.text["Denoising strength"] == "0.5" and image.text["Init image"] == "room.png"
    out = tmp_path / "resized"
    assert main(argv(files, out, *extra)) == 0  # --width/--height 64
    with Image.open(out / "monkey-0.png") as image:
        assert image.size == (SIZE, SIZE) and image.text["Size"] == f"{SIZE}x{SIZE}"
        assert image.text["Size from"].startswith("--width/--height")


def test_ctrl_c_ends_in_one_line_and_writes_nothing(files, tmp_path, capsys, monkeypatch):
    from monkey.diffusers import pipeline

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "monkey_generate", interrupted)
    assert exit_code(argv(files, tmp_path / "out", "--steps", "2")) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "python -m monkey generate: interrupted; nothing was written"
    )
    assert not (tmp_path / "out").exists()


def exit_code(arguments: list[str]) -> int:
    """``main``'s exit code; a KeyboardInterrupt escaping it fails the test (not the session)."""
    try:
        return main(arguments)
    except SystemExit as exit_info:
        return exit_info.code
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command as a traceback")


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
