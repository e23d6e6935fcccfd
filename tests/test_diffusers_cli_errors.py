"""README's table of mistakes, row by row, through ``python -m monkey`` in a subprocess: each ends
in exactly its one line and exit code, never a traceback. And a normal run is quiet.

Most rows fail before torch is imported, so they take a fraction of a second each; the rows that
read a ``.bin``, ask torch for CUDA or build a scheduler import what they need, and ``--layers``
loads the tiny model.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from tiny_pipeline import SOURCE

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| Mistake | Arguments | Message | Exit |"
BASE = {
    "generate": "--model sd15 --ip-adapter ip-adapter_sd15.safetensors --image-encoder "
    "image_encoder --image dog.png --prompt 'a dog' --out out",
    "evaluate": "--model sd15 --ip-adapter ip-adapter_sd15.safetensors --image-encoder "
    "image_encoder --subjects dreambooth --clip clip-vit-base-patch32 --dino dino-vits16 "
    "--out eval",
}


class Row(NamedTuple):
    mistake: str
    command: str
    arguments: list[str]
    message: str
    exit_code: int


def readme_rows() -> list[Row]:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(HEADER) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        mistake, arguments, message, exit_code = (
            cell.strip() for cell in line.strip("|").split(" | ")
        )
        words = shlex.split(arguments.strip("`"))
        command = words.pop(0) if words[0] in BASE else "generate"
        rows.append(Row(mistake, command, words, message.strip("`"), int(exit_code)))
    return rows


ROWS = readme_rows()


def argv(row: Row) -> list[str]:
    """The base command with the row's flags in place of the base's own."""
    base = shlex.split(BASE[row.command])
    flags: dict[str, list[str]] = {}
    for words in (base, row.arguments):
        current = None
        for word in words:
            if word.startswith("--"):
                current = word
                flags[current] = []
            else:
                flags[current].append(word)
    out = [row.command]
    for flag, values in flags.items():
        out += [flag, *values]
    return out


def run(folder: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "monkey", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def results(user_folder):
    """Every row run once, two at a time (``--device cuda`` only where torch has no CUDA)."""
    rows = [
        row
        for row in ROWS
        if not (row.arguments[:2] == ["--device", "cuda"] and torch.cuda.is_available())
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda row: run(user_folder, argv(row)), rows)
        return {row.mistake: result for row, result in zip(rows, done)}


def test_the_table_covers_the_issue():
    arguments = " ".join(" ".join(row.arguments) for row in ROWS)
    for flag in ("--ip-adapter", "--image-encoder", "--scheduler", "--layers", "--device"):
        assert flag in arguments
    for flag in ("--strength 2", "--width", "--images 0", "--steps 0", "--ip-scale -1"):
        assert flag in arguments
    assert {row.command for row in ROWS} == {"generate", "evaluate"}


@pytest.mark.parametrize("row", ROWS, ids=[row.mistake for row in ROWS])
def test_each_mistake_ends_in_its_one_line(results, row):
    if row.mistake not in results:
        pytest.skip("this machine has CUDA")
    result = results[row.mistake]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == row.exit_code, result.stderr
    assert len(lines) == 1, result.stderr
    prefix = f"python -m monkey {row.command}: error: "
    pattern = ".*".join(re.escape(part) for part in row.message.split("…"))
    assert lines[0].startswith(prefix), lines[0]
    assert re.fullmatch(pattern, lines[0][len(prefix) :]), lines[0]
    assert result.stdout == ""


def test_no_mistake_prints_a_traceback(results):
    for mistake, result in results.items():
        assert "Traceback" not in result.stderr + result.stdout, mistake


def test_a_normal_run_is_quiet(user_folder, tmp_path):
    """No library warnings (torchvision, torch_dtype, accelerate, float32 casts): the progress bar,
    MONKEY's status line and, on stdout, the paths written."""
    flags = "--steps 2 --width 64 --height 64 --layers " + SOURCE + f" --out {tmp_path / 'out'}"
    result = run(user_folder, argv(Row("a normal run", "generate", flags.split(), "", 0)))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for line in result.stderr.replace("\r", "\n").splitlines():
        assert not line.strip() or "step" in line or line.startswith("image 0: "), line
    assert len(result.stdout.split()) == 5  # image, mask, pass 1, plain, sheet


def test_argument_mistakes_are_answered_without_loading_torch(user_folder):
    """``--help`` and mistakes in plain arguments need neither torch nor diffusers: the answer
    comes at once, not after seconds of imports."""
    script = (
        "import sys\n"
        "from monkey.diffusers.cli import main\n"
        "try:\n"
        f"    main({argv(Row('', 'generate', ['--steps', '0'], '', 2))!r})\n"
        "except SystemExit as exit_info:\n"
        "    print(exit_info.code, sorted({'torch', 'diffusers'} & set(sys.modules)))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=user_folder,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.stdout.strip() == "2 []", result.stderr
