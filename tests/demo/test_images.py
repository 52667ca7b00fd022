"""demo-images: a deterministic, balanced shapes dataset in class sub-folders, written atomically."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from backend.demo import shapes, vit
from backend.demo.images import write_demo_images
from backend.errors import DifflensError
from cli import app


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_images_are_balanced_in_class_folders_and_match_their_names(tmp_path):
    counts = write_demo_images(tmp_path / "imgs", n=36, seed=3, progress=False)
    assert counts == {name: 3 for name in sorted(vit.class_names("shape-colour"))}
    files = sorted((tmp_path / "imgs").rglob("*.png"))
    assert len(files) == 36 and {f.parent.parent for f in files} == {tmp_path / "imgs"}
    for f in files:
        colour, shape = f.parent.name.split("-")
        _, size, position, background = f.stem.split("-")
        img = np.asarray(Image.open(f))
        assert img.shape == (vit.RESOLUTION, vit.RESOLUTION, 3) and img.dtype == np.uint8
        # the pixels show what the folder and file name say (the world's scorer reads them back)
        assert shapes.score_image(img) == {"colour": colour, "shape": shape, "size": size, "position": position,
                                           "background": background}, f


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    write_demo_images(tmp_path / "a", n=12, classes="shape", seed=0, progress=False)
    write_demo_images(tmp_path / "b", n=12, classes="shape", seed=0, progress=False)
    write_demo_images(tmp_path / "c", n=12, classes="shape", seed=1, progress=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["circle", "square", "triangle"]
    assert _files(tmp_path / "a") != _files(tmp_path / "c")


def test_a_non_empty_directory_is_refused_and_left_alone_unless_overwrite(tmp_path):
    out = tmp_path / "imgs"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(DifflensError, match="not empty; give --overwrite"):
        write_demo_images(out, n=12, progress=False)
    assert _files(out) == {"mine.txt": b"keep"}
    write_demo_images(out, n=12, classes="shape", overwrite=True, progress=False)
    assert not (out / "mine.txt").exists() and len(list(out.rglob("*.png"))) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]  # no staging or old copy left beside it


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n": 0}, "--n must be at least 1"),
    ({"classes": "colour"}, "unknown --classes 'colour'; use one of shape, shape-colour"),
    ({"noise": -1.0}, "--noise must be >= 0"),
])
def test_bad_input_is_a_one_line_error_that_writes_nothing(tmp_path, kwargs, message):
    with pytest.raises(DifflensError, match=message):
        write_demo_images(tmp_path / "imgs", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_dataset_and_refuses_a_file(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["demo-images", "--out", str(tmp_path / "imgs"), "--n", "24"])
    assert result.exit_code == 0, result.output
    assert f"wrote 24 images in 12 classes to {tmp_path / 'imgs'}/" in result.output
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["demo-images", "--out", str(tmp_path / "file")])
    assert result.exit_code == 1 and "is a file; give a directory" in result.output
