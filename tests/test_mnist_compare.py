"""`mnist_siamese.py compare` on the model of one dry run.

Digit images are written from the shipped fixture's test set as PNG files, the way a user
would hand them to the command. Runs under every backend (CI runs it under JAX without
TensorFlow too): reading images needs only Pillow. A table of pairs, one bad input and the
wrong arguments run the script in a subprocess, as a user does; the other cases call `main()`
in this process, which returns the exit code the script exits with and spares the
subprocess's imports (about 5 s).
"""

import csv
import json
import pathlib
import re

import helpers
import numpy as np
import pytest
from helpers import FIXTURE, MNIST
from PIL import Image

# Imported here, before any test: the first import sets process-wide settings (environment
# variables of TensorFlow's) that conftest.py's guard would blame on the test.
import mnist_siamese

PROG = "mnist_siamese.py compare"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dry run's folder, and test digits as PNGs: `(folder, run_dir, {name: label})`."""
    folder = tmp_path_factory.mktemp("compare")
    result = helpers.run(MNIST, ["--dry-run", "--no-plots", "--output-dir", "run"], folder)
    assert result.returncode == 0, helpers.describe(result)
    with np.load(FIXTURE) as data:
        images, labels = data["x_test"][:40], data["y_test"][:40]
    digits = {}
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        name = f"digit{index:02d}.png"
        Image.fromarray(image).save(folder / name)
        digits[name] = int(label)
    return folder, folder / "run", digits


def distance_of(stdout):
    """The distance `compare` prints for one pair."""
    return float(re.search(r"^Distance: ([\d.]+)$", stdout, re.M)[1])


@pytest.mark.slow
def test_an_image_compared_with_itself_is_at_distance_about_zero(trained, capsys):
    folder, run_dir, digits = trained
    name = next(iter(digits))
    args = ["compare", name, name, "--run-dir", run_dir]
    result = helpers.run_main(mnist_siamese, args, folder, capsys)
    assert result.returncode == 0, helpers.describe(result)
    assert distance_of(result.stdout) < 1e-3
    threshold = json.loads((run_dir / "metrics.json").read_text())["best_threshold"]
    assert f"At the run's best threshold {threshold:.4g}: same digit" in result.stdout
    assert "At the example's threshold 0.5: same digit" in result.stdout


@pytest.mark.slow
def test_dark_digit_on_light_ground_is_inverted_and_said(trained, capsys):
    folder, run_dir, digits = trained
    name = next(iter(digits))
    pixels = np.asarray(Image.open(folder / name))
    # Ink on paper, larger and in colour: the command must bring it back to MNIST's form.
    Image.fromarray(255 - pixels).convert("RGB").resize((112, 112)).save(folder / "paper.jpg")
    args = ["compare", name, "paper.jpg", "--run-dir", run_dir]
    result = helpers.run_main(mnist_siamese, args, folder, capsys)
    assert result.returncode == 0, helpers.describe(result)
    assert "paper.jpg: a dark digit on a light ground; inverted" in result.stdout
    assert name + ":" not in result.stdout  # the MNIST-like image is not inverted
    # Same digit, resampled twice: close, far closer than the run's threshold.
    threshold = json.loads((run_dir / "metrics.json").read_text())["best_threshold"]
    assert distance_of(result.stdout) < threshold / 2


@pytest.mark.slow
def test_many_pairs_from_a_csv_follow_the_best_threshold(trained):
    folder, run_dir, digits = trained
    names = sorted(digits)
    rows = [(a, b) for i, a in enumerate(names) for b in names[i + 1 : i + 6]]
    (folder / "pairs.csv").write_text("image_a,image_b\n" + "".join(f"{a},{b}\n" for a, b in rows))
    result = helpers.run(MNIST, ["compare", "--pairs", "pairs.csv", "--run-dir", run_dir], folder)
    assert result.returncode == 0, helpers.describe(result)
    output = run_dir / "compared-pairs.csv"
    assert f"wrote {output}" in result.stdout
    with open(output, newline="") as stream:
        table = list(csv.DictReader(stream))
    assert len(table) == len(rows)
    threshold = json.loads((run_dir / "metrics.json").read_text())["best_threshold"]
    same, different = [], []
    for row, (a, b) in zip(table, rows, strict=True):
        assert (pathlib.Path(row["image_a"]).name, pathlib.Path(row["image_b"]).name) == (a, b)
        distance = float(row["distance"])
        assert int(row["same_digit"]) == (distance < threshold)
        assert int(row["same_digit_at_0.5"]) == (distance < 0.5)
        (same if digits[a] == digits[b] else different).append(distance)
    assert same and different
    assert np.mean(same) < np.mean(different)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    ["no run folder", "no model", "other script's model", "missing image", "not an image"],
)
def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, case, capsys):
    folder, run_dir, digits = trained
    name = next(iter(digits))
    args = ["compare", folder / name, folder / name, "--run-dir", run_dir]
    if case == "no run folder":
        args[-1], hints = tmp_path / "nowhere", ("no run folder", "train a model first")
    elif case == "no model":
        args[-1], hints = tmp_path, ("holds no embedding_network.keras",)
    elif case == "other script's model":
        (tmp_path / "embedding.keras").write_bytes(b"")
        args[-1], hints = tmp_path, ("a model of triplet_totally_looks_like.py",)
    elif case == "missing image":
        args[1], hints = tmp_path / "gone.png", ("gone.png: no such image file",)
    else:
        (tmp_path / "notes.png").write_text("not a picture")
        args[2], hints = tmp_path / "notes.png", ("notes.png: not an image",)
    # One case as a user meets it, in its own process; the others through main().
    result = (
        helpers.run(MNIST, args, tmp_path)
        if case == "not an image"
        else helpers.run_main(mnist_siamese, args, tmp_path, capsys)
    )
    helpers.assert_one_line_error(result, PROG, *hints)


def test_wrong_arguments_are_one_line_and_exit_2(tmp_path):
    # The command line is read before Keras is imported: this costs no import.
    result = helpers.run(MNIST, ["compare", "only-one.png"], tmp_path)
    helpers.assert_one_line_error(result, PROG, "give two images, or --pairs CSV")
