"""Sample folders: ``00000.png …``, ``samples.jsonl`` (one {"file", "prompt", "seed"} per line), ``grid.png``.

Folders are written atomically under the output rules of :mod:`dgpo.runtime.output_dir`: an existing, non-empty
folder is refused (with ``overwrite``, replaced only if it is an earlier sample folder of the same tool),
and an interrupted or failed command never leaves a half-written folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from dgpo.errors import UserError, shown
from dgpo.runtime.output_dir import atomic_output_dir


def image_grid(images: np.ndarray, columns: int | None = None, scale: int = 2, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (N, S, S, 3) into one uint8 image with a grey ``pad`` between tiles."""
    n, s = len(images), images.shape[1]
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / columns)
    cell = s * scale + pad
    grid = np.full((rows * cell + pad, columns * cell + pad, 3), 64, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        big = im.repeat(scale, 0).repeat(scale, 1)
        grid[pad + r * cell: pad + r * cell + s * scale, pad + c * cell: pad + c * cell + s * scale] = big
    return grid


def write_samples(out_dir: str | Path, images: np.ndarray, records: list[dict], columns: int | None = None,
                  tool: str = "dgpo sample", overwrite: bool = False) -> Path:
    """Write a sample folder (atomically); ``records[i]`` holds at least ``prompt`` and ``seed``."""
    if len(images) != len(records):
        raise ValueError(f"{len(images)} images but {len(records)} records")
    with atomic_output_dir(out_dir, tool, overwrite) as tmp:
        with open(tmp / "samples.jsonl", "w") as f:
            for i, (im, rec) in enumerate(zip(images, records)):
                name = f"{i:05d}.png"
                Image.fromarray(im).save(tmp / name)
                f.write(json.dumps({"file": name, **rec}) + "\n")
        Image.fromarray(image_grid(images, columns)).save(tmp / "grid.png")
    return Path(out_dir)


def read_samples(folder: str | Path) -> tuple[np.ndarray, list[dict]]:
    """Images (N, S, S, 3) uint8 and records of a sample folder, with clear errors when it is malformed."""
    folder = Path(folder)
    index = folder / "samples.jsonl"
    if not index.is_file():
        raise UserError(f"{str(folder)!r} is not a samples folder: it has no samples.jsonl "
                        f"(make one with `dgpo sample`)")
    records, images = [], []
    for n, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            file, _ = rec["file"], rec["prompt"]  # both required
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{index}:{n}: expected a JSON object with 'file' and 'prompt', got {line[:80]!r}") from None
        path = (folder / str(file)).resolve()
        if not path.is_relative_to(folder.resolve()):  # a listed ../../etc/passwd is never opened
            raise UserError(f"{index}:{n}: image {shown(file)!r} is outside {str(folder)!r}: a samples folder lists "
                            f"its own files only")
        if not path.is_file():
            raise UserError(f"{index}:{n}: image {shown(file)!r} is missing from {str(folder)!r}")
        try:
            with Image.open(path) as opened:
                images.append(np.asarray(opened.convert("RGB")))
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(f"{index}:{n}: {shown(file)!r} is not a readable image ({type(e).__name__}): "
                            f"write the folder again with `dgpo sample`") from None
        records.append(rec)
    if not records:
        raise UserError(f"{index} lists no samples")
    sizes = {im.shape for im in images}
    if len(sizes) != 1:
        raise UserError(f"images in {str(folder)!r} have different sizes {sorted(sizes)}")
    return np.stack(images), records


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line (blank lines and lines starting with # are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompt file {str(path)!r} is not UTF-8 text (one prompt per line)") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"prompt file {str(path)!r} has no prompts: write one prompt per line")
    return prompts
