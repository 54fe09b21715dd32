"""Every bad input to mnist_siamese.py gets one clear stderr line and exit code 2.

Most cases call `mnist_siamese.main([...])` in this process (the same code path as the command
line, without paying the TensorFlow import for each case); a few representative ones run the
script in real subprocesses, in parallel, to check the exit code and that no traceback and no
start-up log noise reaches the terminal.
"""

import json

import helpers
import numpy as np
import pytest
from helpers import FIXTURE, MNIST

import mnist_siamese

PROG = "mnist_siamese.py"


def check_error(capsys, args, *hints):
    """Run main(args) in process from the test's folder, check its error; return the line.

    `--intra-op-threads 0` keeps TensorFlow's own thread count: left to choose, main()
    would set one thread per operation for the whole test process (TensorFlow reads the
    setting once, when it starts), and every later test would inherit it. The script's own
    choice is checked in a subprocess (tests/test_mnist_cli.py).
    """
    args = [*args, "--intra-op-threads", "0"]
    result = helpers.run_main(mnist_siamese, args, ".", capsys)
    assert "* Accuracy" not in result.stdout
    return helpers.assert_one_line_error(result, PROG, *hints)


@pytest.fixture(scope="module")
def tiny():
    with np.load(FIXTURE) as archive:
        return {name: archive[name] for name in archive.files}


def save_npz(path, arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Run every case from its own empty folder, so relative default outputs stay there."""
    monkeypatch.chdir(tmp_path)


# A run that would train if nothing were wrong (tiny data, one epoch, no plots).
def valid_args(output_dir="out"):
    return ["--data", FIXTURE, "--limit", "600", "--epochs", "1", "--no-plots"] + [
        "--output-dir",
        output_dir,
    ]


# ---------------------------------------------------------------------------
# --data
# ---------------------------------------------------------------------------


def test_missing_data_path(capsys, tmp_path):
    missing = tmp_path / "nowhere" / "mnist.npz"
    line = check_error(capsys, ["--data", missing, "--epochs", "1"], "--data")
    assert str(missing) in line
    assert not (tmp_path / "runs").exists()  # nothing written


def test_data_that_is_not_an_npz(capsys, tmp_path):
    text = tmp_path / "mnist.txt"
    text.write_text("these are not the digits you are looking for\n")
    check_error(capsys, ["--data", text], str(text), ".npz")

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(FIXTURE.read_bytes()[:5000])
    check_error(capsys, ["--data", truncated], str(truncated))

    single_array = tmp_path / "single.npy"
    np.save(single_array, np.zeros((10, 28, 28), np.uint8))
    check_error(capsys, ["--data", single_array], str(single_array))


def test_npz_with_missing_keys(capsys, tmp_path, tiny):
    partial = save_npz(
        tmp_path / "partial.npz", {"x_train": tiny["x_train"], "y_train": tiny["y_train"]}
    )
    check_error(capsys, ["--data", partial], "x_test", "y_test")
    renamed = save_npz(
        tmp_path / "renamed.npz",
        {"images": tiny["x_train"], "y_train": tiny["y_train"]}
        | {"x_test": tiny["x_test"], "y_test": tiny["y_test"]},
    )
    check_error(capsys, ["--data", renamed], "x_train")


@pytest.mark.parametrize(
    "change, hint",
    [
        ({"x_train": lambda a: a.reshape(len(a), -1)}, "x_train"),  # flat 784-pixel rows
        ({"x_test": lambda a: a[:, :, :, None]}, "x_test"),  # an extra channel axis
        ({"y_train": lambda a: a[:-1]}, "y_train"),  # one label short
        ({"y_test": lambda a: a[:, None]}, "y_test"),  # labels as a column
        ({"x_test": lambda a: a[:, :20, :20]}, "(20, 20)"),  # other size than training
        ({"x_train": lambda a: a[:0], "y_train": lambda a: a[:0]}, "x_train"),  # empty
        ({"y_train": lambda a: a.astype(np.int64) + 5}, "y_train"),  # classes beyond 9
        ({"y_test": lambda a: a.astype(np.float32) + 0.5}, "y_test"),  # not integers
        ({"x_train": lambda a: a.astype(np.int32) * 2}, "x_train"),  # values beyond 255
    ],
    ids=[
        "flat-images",
        "channel-axis",
        "label-short",
        "label-column",
        "size-mismatch",
        "empty",
        "class-beyond-9",
        "float-labels",
        "pixels-beyond-255",
    ],
)
def test_npz_with_wrong_shapes_or_values(capsys, tmp_path, tiny, change, hint):
    arrays = dict(tiny)
    for name, function in change.items():
        arrays[name] = function(arrays[name])
    path = save_npz(tmp_path / "odd.npz", arrays)
    check_error(capsys, ["--data", path], hint)


def test_labels_with_an_absent_digit(capsys, tmp_path, tiny):
    keep = tiny["y_train"] != 7
    arrays = dict(tiny, x_train=tiny["x_train"][keep], y_train=tiny["y_train"][keep])
    path = save_npz(tmp_path / "no_sevens.npz", arrays)
    check_error(capsys, ["--data", path], "7", "training")


def test_labels_with_a_single_image_of_a_digit(capsys, tmp_path, tiny):
    threes = np.flatnonzero(tiny["y_test"] == 3)
    keep = np.ones(len(tiny["y_test"]), bool)
    keep[threes[1:]] = False
    arrays = dict(tiny, x_test=tiny["x_test"][keep], y_test=tiny["y_test"][keep])
    path = save_npz(tmp_path / "one_three.npz", arrays)
    assert np.sum(arrays["y_test"] == 3) == 1
    check_error(capsys, ["--data", path], "3", "test")


def test_limit_that_leaves_a_digit_short(capsys, tiny):
    # The first 30 test images hold no 8 (see the fixture): --limit 30 leaves it empty.
    assert 8 not in tiny["y_test"][:30]
    check_error(capsys, ["--data", FIXTURE, "--limit", "30"], "--limit", "8")


# ---------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [
        ("--epochs", "0"),
        ("--epochs", "-3"),
        ("--epochs", "two"),
        ("--batch-size", "0"),
        ("--batch-size", "-128"),
        ("--limit", "0"),
        ("--limit", "-1"),
        ("--margin", "0"),
        ("--margin", "-1.0"),
        ("--margin", "nan"),
        ("--margin", "inf"),
        ("--learning-rate", "0"),
        ("--intra-op-threads", "-1"),
        ("--intra-op-threads", "1.5"),
    ],
)
def test_non_positive_numbers(capsys, option, value):
    check_error(capsys, ["--data", FIXTURE, option, value], option, value)


# ---------------------------------------------------------------------------
# --output-dir and earlier runs
# ---------------------------------------------------------------------------


def test_output_dir_that_is_a_file(capsys, tmp_path):
    occupied = tmp_path / "results"
    occupied.write_text("someone's notes\n")
    check_error(capsys, valid_args(occupied), "--output-dir", str(occupied))
    assert occupied.read_text() == "someone's notes\n"


def test_output_dir_that_cannot_be_written(capsys, tmp_path):
    # Tests may run as root, which ignores permission bits: a folder below a regular file
    # cannot be created by anyone.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    below = blocker / "runs" / "mnist"
    check_error(capsys, valid_args(below), "--output-dir", "cannot be written")


def test_finished_run_is_kept_without_overwrite(capsys, tmp_path):
    output_dir = tmp_path / "done"
    output_dir.mkdir()
    finished = json.dumps({"test_accuracy": 0.97, "epochs": 20, "dry_run": False})
    (output_dir / "metrics.json").write_text(finished)
    (output_dir / "siamese_model.keras").write_bytes(b"a trained model")
    check_error(capsys, valid_args(output_dir), "--overwrite", str(output_dir))
    assert (output_dir / "metrics.json").read_text() == finished
    assert (output_dir / "siamese_model.keras").read_bytes() == b"a trained model"
    # A dry run does not replace a real run either.
    check_error(capsys, ["--dry-run", "--output-dir", output_dir], "--overwrite")
    assert (output_dir / "metrics.json").read_text() == finished


def test_interrupted_run_needs_resume_or_overwrite(capsys, tmp_path):
    output_dir = tmp_path / "interrupted"
    (output_dir / "backup").mkdir(parents=True)
    (output_dir / "backup" / "latest.weights.h5").write_bytes(b"weights of epoch 4")
    (output_dir / "history-progress.csv").write_text("epoch,loss\n0,0.3\n")
    check_error(capsys, valid_args(output_dir), "--resume", "--overwrite")
    assert (output_dir / "backup" / "latest.weights.h5").read_bytes() == b"weights of epoch 4"
    assert (output_dir / "history-progress.csv").read_text() == "epoch,loss\n0,0.3\n"
    assert not (output_dir / "metrics.json").exists()


# ---------------------------------------------------------------------------
# The same, as the user sees it: real subprocesses (run in parallel)
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_errors_from_the_command_line(tmp_path):
    not_npz = tmp_path / "digits.csv"
    not_npz.write_text("0,0,0\n")
    occupied = tmp_path / "occupied"
    occupied.write_text("")
    cases = {
        "missing data": (["--data", tmp_path / "missing.npz"], ["--data", "missing.npz"]),
        "not npz": (["--data", not_npz], [str(not_npz)]),
        "negative margin": (["--margin", "-0.5"], ["--margin"]),
        "output file": (valid_args(occupied), ["--output-dir", str(occupied)]),
    }
    # Each case in a folder of its own: in one folder, two cases would race for the lock of
    # the default runs/mnist_siamese, and one of them would be told it is in use.
    folders = {name: tmp_path / f"case{index}" for index, name in enumerate(cases)}
    for folder in folders.values():
        folder.mkdir()
    processes = {
        name: helpers.start(MNIST, args, folders[name]) for name, (args, _) in cases.items()
    }
    for name, process in processes.items():
        result = helpers.finish(process)
        helpers.assert_one_line_error(result, PROG, *cases[name][1])
        assert "* Accuracy" not in result.stdout, name
    assert not any((folder / "runs").exists() for folder in folders.values())
