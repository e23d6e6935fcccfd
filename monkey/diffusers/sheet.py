"""The side-by-side sheet (reference | plain IP-Adapter | MONKEY | mask) and PNG settings text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

COLUMNS = ("reference", "plain IP-Adapter", "MONKEY", "mask")
LABEL_HEIGHT = 14
MIN_CELL_WIDTH = 104
"""Wide enough for the longest column label in Pillow's default font."""


def infotext(prompt: str, params: Mapping[str, object]) -> str:
    """The WebUI's ``parameters`` layout (prompt line, then ``key: value, ...``), so PNG Info and
    MONKEY's paste-back read the settings; a value with a comma or colon is quoted as the WebUI
    quotes it."""

    def value(item: object) -> str:
        text = str(item)
        return f'"{text}"' if any(c in text for c in ',:\n"') else text

    return prompt + "\n" + ", ".join(f"{key}: {value(item)}" for key, item in params.items())


def png_info(prompt: str, params: Mapping[str, object]) -> PngInfo:
    """PNG text: ``parameters`` (the whole infotext) and one chunk per setting."""
    info = PngInfo()
    info.add_text("parameters", infotext(prompt, params))
    for key, item in params.items():
        info.add_text(str(key), str(item))
    return info


def save_png(image: Image.Image, path: Path, info: PngInfo | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path


def sheet(
    rows: Sequence[Sequence[Image.Image | None]],
    cell: tuple[int, int],
    columns: Sequence[str] = COLUMNS,
) -> Image.Image:
    """One row per image, one column per ``columns`` entry, each cell fitted into ``cell``
    (width, height) on white; a missing cell stays white."""
    width, height = max(cell[0], MIN_CELL_WIDTH), cell[1]
    out = Image.new("RGB", (width * len(columns), LABEL_HEIGHT + height * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for column, name in enumerate(columns):
        draw.text((column * width + 2, 1), name, fill="black")
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            if image is None:
                continue
            fitted = image.convert("RGB")
            fitted.thumbnail((width, height))
            x = column * width + (width - fitted.width) // 2
            y = LABEL_HEIGHT + row * height + (height - fitted.height) // 2
            out.paste(fitted, (x, y))
    return out
