"""Image datasets (--images): class sub-folders or labels files, and the one-line errors, before any run is made."""

import json

import pytest
from tiny_classifiers import write_image_folder
from typer.testing import CliRunner

from backend.errors import DifflensError
from backend.run.config import RunConfig
from backend.run.images import check_images, images_digest, load_images, run_inputs

runner = CliRunner()


def test_a_folder_gives_one_record_per_image_with_its_class(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=2)
    records = load_images(root)
    assert [(r.prompt, r.group) for r in records] == [("blue/blue-0.png", "blue"), ("blue/blue-1.png", "blue"),
                                                      ("red/red-0.png", "red"), ("red/red-1.png", "red")]
    assert records[0].attributes == {"class": "blue"} and records[0].image == str((root / "blue/blue-0.png").resolve())
    check_images(records)
    before = images_digest(records)
    (root / "red" / "red-1.png").write_bytes((root / "red" / "red-0.png").read_bytes() + b"\0")
    assert images_digest(load_images(root)) != before


def test_csv_and_jsonl_labels_files_name_path_and_class(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=1)
    csv = tmp_path / "imgs" / "labels.csv"
    csv.write_text("path,class,extra\nred/red-0.png,warm,x\nblue/blue-0.png,cold,y\n")
    assert [(r.prompt, r.group) for r in load_images(csv)] == [("blue/blue-0.png", "cold"), ("red/red-0.png", "warm")]
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text(json.dumps({"path": str(root / "red/red-0.png"), "class": "warm"}) + "\n# a comment\n"
                     + json.dumps({"path": "imgs/blue/blue-0.png", "class": "cold"}) + "\n")
    records = load_images(jsonl)
    assert [(r.prompt, r.group) for r in records] == [("imgs/blue/blue-0.png", "cold"), ("imgs/red/red-0.png", "warm")]


@pytest.mark.parametrize("make, message", [
    (lambda d: d.mkdir(), "holds no images"),
    (lambda d: (d / "a").mkdir(parents=True), "holds no images"),
    (lambda d: (d.mkdir(), (d / "x.png").write_bytes(b"")), "outside class sub-folders"),
    (lambda d: None, "not found"),
    (lambda d: (d.parent / "labels.csv").write_text("file,label\n"), "lacks column(s) class, path"),
    (lambda d: (d.parent / "labels.jsonl").write_text("{oops\n"), "labels.jsonl:1: not JSON"),
    (lambda d: (d.parent / "labels.jsonl").write_text('{"path": "a.png"}\n'), "give both a path and a class"),
])
def test_bad_datasets_are_one_line_errors(tmp_path, make, message):
    target = tmp_path / "data"
    make(target)
    spec = next((p for p in (tmp_path / "labels.csv", tmp_path / "labels.jsonl") if p.exists()), target)
    with pytest.raises(DifflensError) as exc:
        load_images(spec)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_an_unreadable_image_is_named(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=1)
    (root / "red" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DifflensError) as exc:
        check_images(load_images(root))
    assert str((root / "red" / "broken.png").resolve()) in str(exc.value) and "\n" not in str(exc.value)


def test_prompts_and_images_go_to_the_right_model_kind(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=1)
    with pytest.raises(DifflensError, match="--images is for image classifiers"):
        run_inputs(RunConfig(images=str(root)), "diffusion")
    with pytest.raises(DifflensError, match="takes images, not prompts"):
        run_inputs(RunConfig(model="vit", prompts="p.txt", images=str(root)), "classifier")
    with pytest.raises(DifflensError, match="give its images with --images"):
        run_inputs(RunConfig(model="vit"), "classifier")
    assert len(run_inputs(RunConfig(model="vit", images=str(root)), "classifier")) == 2


def cli(*args):
    import cli as cli_module

    return runner.invoke(cli_module.app, [str(a) for a in args])


def test_capture_refuses_bad_input_before_creating_the_run(vit_dir, untrained_demo_dir, tmp_path, one_thread):
    good = write_image_folder(tmp_path / "imgs", per_class=1)
    bad = write_image_folder(tmp_path / "bad", per_class=1)
    (bad / "red" / "zz.png").write_bytes(b"\x89PNG broken")
    runs = tmp_path / "runs"
    cases = [
        (["--model", vit_dir, "--images", bad], "cannot read image"),
        (["--model", vit_dir, "--images", tmp_path / "empty"], "not found"),
        (["--model", vit_dir, "--prompts", "data/prompts/demo.txt", "--images", good], "takes images, not prompts"),
        (["--model", untrained_demo_dir, "--images", good], "--images is for image classifiers"),
        (["--model", vit_dir, "--images", good, "--tokens", "pooled"], "capture.tokens is 'pooled'"),
    ]
    for args, message in cases:
        result = cli("capture", "--runs-dir", runs, "--name", "x", "--layer", "vit.layers.1", *args)
        assert result.exit_code == 1 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not (runs / "x").exists()
