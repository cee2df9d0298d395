"""scripts/side_by_side.py: one labelled picture of several models' samples for the same prompts and seeds."""

import json
from pathlib import Path

import numpy as np
from conftest import load_script
from PIL import Image

from dgpo.sampling.samples_io import write_samples

side_by_side = load_script("scripts/side_by_side.py")

PROMPTS = ["a photo of a red circle", "a photo of two squares", "a photo of a blue triangle"]


def samples(folder: Path, colour: int, seeds=(0, 1, 2, 3, 4, 5)) -> Path:
    """Two images per prompt; the first image of prompt c is a flat colour of value colour + c."""
    images = np.zeros((6, 8, 8, 3), np.uint8)
    for i in range(6):
        images[i] = colour + i // 2 if i % 2 == 0 else 255
    records = [{"prompt": PROMPTS[i // 2], "seed": s} for i, s in enumerate(seeds)]
    return write_samples(folder, images, records)


def test_rows_are_models_and_columns_are_prompts(tmp_path, capsys):
    a, b = samples(tmp_path / "a", 10), samples(tmp_path / "b", 100)
    assert side_by_side.main(["--row", f"base={a}", "--row", f"trained={b}", "--out", str(tmp_path / "out"),
                              "--scale", "2"]) == 0
    picture = np.asarray(Image.open(tmp_path / "out" / "side_by_side.png"))
    # layout: label column 120 px, header 28 px, pad 4 px, cells of 8·2 = 16 px
    for r, colour in enumerate((10, 100)):
        for c in range(3):
            y, x = 28 + r * 20 + 4 + 8, 120 + c * 20 + 4 + 8
            assert picture[y, x].tolist() == [colour + c] * 3, (r, c)
    meta = json.loads((tmp_path / "out" / "side_by_side.json").read_text())
    assert [r["name"] for r in meta["rows"]] == ["base", "trained"]
    assert [c["prompt"] for c in meta["columns"]] == PROMPTS and [c["seed"] for c in meta["columns"]] == [0, 2, 4]


def test_folders_of_other_seeds_are_refused_and_nothing_is_written(tmp_path, capsys):
    a, b = samples(tmp_path / "a", 10), samples(tmp_path / "b", 100, seeds=(7, 8, 9, 10, 11, 12))
    assert side_by_side.main(["--row", f"base={a}", "--row", f"other={b}", "--out", str(tmp_path / "out")]) == 2
    assert "same prompts and seeds" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert side_by_side.main(["--row", "no-equals-sign", "--out", str(tmp_path / "out")]) == 2
