"""triplet_totally_looks_like.py run as a user would: in subprocesses, offline, on CPU.

Where the process is not what a test checks (most bad-input cases, a resumed run), the test
calls the script's `main()` in this process instead, which spares the subprocess's imports.
"""

import concurrent.futures
import csv
import functools
import io
import json
import os
import pathlib
import signal
import time

import helpers
import numpy as np
import pytest
from helpers import TRIPLET, describe
from PIL import Image

import triplet_totally_looks_like as tll
from siamese_support import stores, synthetic
from triplet_totally_looks_like import keras

PROG = "triplet_totally_looks_like.py"


# ---------------------------------------------------------------------------
# --dry-run end to end
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("dry_run")
    start = time.perf_counter()
    result = helpers.run(TRIPLET, ["--dry-run"], cwd)
    seconds = time.perf_counter() - start
    output_dir = cwd / "runs" / "triplet_totally_looks_like_dry_run"
    return result, output_dir, seconds


@pytest.mark.slow
def test_dry_run_succeeds_quietly_and_quickly(dry_run):
    result, _, seconds = dry_run
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "Backend: tensorflow. Device: CPU" or (
        result.stdout.startswith("Backend: tensorflow. Device: GPU")
    )
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == ""
    assert "48 image pairs" in result.stdout
    assert "38 training pairs, 10 validation pairs" in result.stdout
    assert seconds < 120


@pytest.mark.slow
def test_dry_run_writes_every_output(dry_run):
    _, output_dir, _ = dry_run
    expected = {
        "embedding.keras",
        "history.csv",
        "metrics.json",
        "split.json",
        "settings.json",
        "similarities.csv",
        "triplets.png",
        "loss.png",
        "distances.png",
        "retrieval.png",
        "logs",
    }
    # No temporary files, no backup, no progress log are left once the run is finished.
    assert {path.name for path in output_dir.iterdir()} == expected
    # The TensorBoard logs of the epoch (requirements.txt installs tensorboard).
    for side in ("train", "validation"):
        assert len(list((output_dir / "logs" / side).glob("events.out.tfevents.*"))) == 1, side
    # Beside the validation curves, TensorBoard's projector files: 10 validation pairs.
    projector_files = output_dir / "logs" / "validation"
    for name in ("projector_config.pbtxt", "metadata.tsv", "sprite.png"):
        assert (projector_files / name).is_file(), name
    assert np.loadtxt(projector_files / "embeddings.tsv", delimiter="\t").shape == (20, 256)
    for name in expected:
        if name.endswith(".png"):
            content = (output_dir / name).read_bytes()
            assert content.startswith(b"\x89PNG\r\n\x1a\n") and len(content) > 5000
            with Image.open(io.BytesIO(content)) as image:
                assert min(image.size) > 200

    with open(output_dir / "history.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["epoch"] for row in rows] == ["0"]
    assert np.isfinite(float(rows[0]["loss"])) and np.isfinite(float(rows[0]["val_loss"]))

    split = json.loads((output_dir / "split.json").read_text())
    assert set(split) == {"train", "validation"}
    assert len(split["train"]) == 38 and len(split["validation"]) == 10
    assert not set(split["train"]) & set(split["validation"])
    assert sorted(split["train"] + split["validation"]) == [f"{n:05d}.jpg" for n in range(48)]

    metrics = json.loads((output_dir / "metrics.json").read_text())
    for key in (
        "val_loss",
        "triplet_accuracy_before",
        "triplet_accuracy",
        "recall_at_1_before",
        "recall_at_1",
        "recall_at_5",
        "recall_at_10",
        "positive_similarity",
        "negative_similarity",
        "seconds_per_epoch",
    ):
        assert isinstance(metrics[key], float), key
    assert metrics["val_loss"] == pytest.approx(float(rows[0]["val_loss"]), rel=1e-5)
    for key in ("triplet_accuracy_before", "triplet_accuracy", "recall_at_1_before"):
        assert metrics[key] in [n / 10 for n in range(11)]
    assert 0 <= metrics["recall_at_1"] <= metrics["recall_at_5"] <= metrics["recall_at_10"] <= 1
    assert -1 <= metrics["negative_similarity"] <= 1 and -1 <= metrics["positive_similarity"] <= 1
    assert metrics["epochs"] == 1 and metrics["dry_run"] is True
    assert len(metrics["epoch_seconds"]) == 1 and metrics["steps_per_execution"] == 1  # a CPU
    assert metrics["image_size"] == 64 and metrics["weights"] is None
    assert metrics["validation_pairs"] == 10 and metrics["skipped_pairs"] == []


@pytest.mark.slow
def test_dry_run_model_reloads_and_gives_the_same_embeddings(dry_run, tmp_path):
    _, output_dir, _ = dry_run
    # This process never built the model: only `import triplet_totally_looks_like`
    # registers the custom layers, and the default safe mode must accept the file.
    model = keras.saving.load_model(output_dir / "embedding.keras")
    assert model.name == "Embedding"
    assert model.input.shape[1:] == (64, 64, 3)
    # The dry run's data is generated from the seed: regenerate it to embed the same files.
    data_dir = synthetic.make_synthetic_dataset(tmp_path, pairs=tll.dry_run_pairs, seed=42)
    with open(output_dir / "similarities.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 10
    anchors = [str(data_dir / "left" / row["anchor"]) for row in rows]
    positives = [str(data_dir / "right" / row["positive"]) for row in rows]
    negatives = [str(data_dir / row["negative"]) for row in rows]
    for anchor, negative in zip(anchors, negatives, strict=True):
        assert pathlib.Path(negative).stem != pathlib.Path(anchor).stem

    def embed(files):
        load_image = functools.partial(tll.preprocess_image, image_size=(64, 64))
        return model.predict(stores.image_batches(files, load_image, 32), verbose=0)

    anchor_embeddings = embed(anchors)
    ap = np.sum((anchor_embeddings - embed(positives)) ** 2, axis=1)
    an = np.sum((anchor_embeddings - embed(negatives)) ** 2, axis=1)
    np.testing.assert_allclose(ap, [float(row["positive_distance"]) for row in rows], rtol=1e-3)
    np.testing.assert_allclose(an, [float(row["negative_distance"]) for row in rows], rtol=1e-3)


# ---------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, no traceback
# ---------------------------------------------------------------------------


# The script run as `python triplet_totally_looks_like.py ...`, reporting afterwards whether
# TensorFlow or Keras had been imported when the command line answered.
BEFORE_TENSORFLOW = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    loaded = sorted({"tensorflow", "keras"} & set(sys.modules))
    print("imported:", ", ".join(loaded) or "nothing", file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args, code, expected",
    [
        (["--help"], 0, "usage: triplet_totally_looks_like.py"),
        (["--epochs", "0"], 2, "argument --epochs: must be a positive number"),
        (["--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
    ],
)
def test_help_and_mistakes_answer_before_tensorflow_is_imported(tmp_path, args, code, expected):
    result = helpers.run(TRIPLET, args, tmp_path, python_code=BEFORE_TENSORFLOW, timeout=120)
    assert result.returncode == code, describe(result)
    assert expected in result.stdout + result.stderr
    assert result.stderr.splitlines()[-1] == "imported: nothing"


def _make_case_folders(root):
    """Data folders for the bad-input cases, from one small generated dataset."""
    good = synthetic.make_synthetic_dataset(root / "good", pairs=40, image_size=32, seed=1)
    folders = {"good": good}

    no_left = root / "no_left"
    (no_left / "right").mkdir(parents=True)
    (no_left / "right" / "00000.jpg").write_bytes((good / "right" / "00000.jpg").read_bytes())
    folders["no_left"] = no_left

    right_empty = synthetic.make_synthetic_dataset(root / "right_empty", pairs=3, image_size=32)
    for path in (right_empty / "right").iterdir():
        path.unlink()
    folders["right_empty"] = right_empty

    uneven = synthetic.make_synthetic_dataset(root / "uneven", pairs=10, image_size=32)
    (uneven / "right" / "00009.jpg").unlink()
    folders["uneven"] = uneven

    misnamed = synthetic.make_synthetic_dataset(root / "misnamed", pairs=10, image_size=32)
    (misnamed / "right" / "00003.jpg").rename(misnamed / "right" / "00003b.jpg")
    folders["misnamed"] = misnamed

    unreadable = synthetic.make_synthetic_dataset(root / "unreadable", pairs=3, image_size=32)
    for path in (unreadable / "left").iterdir():
        path.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    folders["unreadable"] = unreadable

    (root / "a_file").write_text("not a folder")
    finished = root / "finished"
    finished.mkdir()
    (finished / "metrics.json").write_text(json.dumps({"dry_run": False}))
    (root / "interrupted" / "backup").mkdir(parents=True)
    (root / "interrupted" / "backup" / "training_metadata.json").write_text('{"epoch": 1}')
    (root / "junk.weights.h5").write_bytes(b"this is not an HDF5 file")
    return folders


BAD_INPUT_CASES = {
    "data_dir_missing": (["--data-dir", "nowhere"], ["--data-dir nowhere: no such folder"]),
    "left_missing": (["--data-dir", "{no_left}"], ["has no left/ folder"]),
    "right_empty": (["--data-dir", "{right_empty}"], ["right holds no images"]),
    "counts_differ": (
        ["--data-dir", "{uneven}"],
        ["left/ holds 10 files and right/ holds 9"],
    ),
    "names_do_not_pair": (
        ["--data-dir", "{misnamed}"],
        ["do not pair up", "left/00003.jpg", "right/00003b.jpg"],
    ),
    "weights_file_missing": (
        ["--data-dir", "{good}", "--weights", "missing.weights.h5"],
        ["--weights missing.weights.h5: no such file"],
    ),
    "weights_file_incompatible": (
        ["--data-dir", "{good}", "--weights", "junk.weights.h5", "--no-plots"],
        ["--weights junk.weights.h5: cannot load it into ResNet50"],
    ),
    "image_size_too_small": (
        ["--data-dir", "{good}", "--image-size", "16"],
        ["argument --image-size: must be at least 32"],
    ),
    "batch_larger_than_training_split": (
        ["--data-dir", "{good}", "--batch-size", "33"],
        ["--batch-size 33 is larger than the 32 training pairs"],
    ),
    "negatives_unknown": (
        ["--negatives", "hardest"],
        ["argument --negatives: invalid choice: 'hardest'"],
    ),
    "mining_in_batches_of_one_pair": (
        ["--data-dir", "{good}", "--negatives", "semi-hard", "--batch-size", "1"],
        ["--negatives semi-hard chooses", "--batch-size must be at least 2, got 1"],
    ),
    "limit_leaves_too_few": (
        ["--data-dir", "{good}", "--limit", "4"],
        ["leave 3 training and 1 validation pairs", "at least 2"],
    ),
    "all_pairs_unreadable": (
        ["--data-dir", "{unreadable}"],
        ["0 pairs split", "at least 2"],
    ),
    "epochs_zero": (["--epochs", "0"], ["argument --epochs: must be a positive number"]),
    "batch_size_negative": (
        ["--batch-size", "-3"],
        ["argument --batch-size: must be a positive number"],
    ),
    "limit_zero": (["--limit", "0"], ["argument --limit: must be a positive number"]),
    "margin_zero": (["--margin", "0"], ["argument --margin: must be a positive number"]),
    "learning_rate_not_a_number": (["--learning-rate", "fast"], ["'fast' is not a number"]),
    "validation_split_one": (["--validation-split", "1"], ["between 0 and 1"]),
    "output_dir_is_a_file": (
        ["--data-dir", "{good}", "--output-dir", "a_file"],
        ["--output-dir a_file is a file"],
    ),
    "output_dir_not_writable": (
        ["--data-dir", "{good}", "--output-dir", "a_file/below"],
        ["--output-dir a_file/below cannot be written"],
    ),
    "output_dir_holds_interrupted_run": (
        ["--data-dir", "{good}", "--output-dir", "interrupted"],
        ["holds an interrupted run", "--resume", "--overwrite"],
    ),
    "output_dir_holds_finished_run": (
        ["--data-dir", "{good}", "--output-dir", "finished"],
        ["already holds a finished run", "--overwrite"],
    ),
}


# Cases also run as `python triplet_totally_looks_like.py ...`, the real entry point: a mistake
# argparse answers before TensorFlow's import, and a late one, after the import and after
# unreadable images were decoded (whose decoder must not write to stderr). The others call
# `main()` in this process, which spares each the subprocess's imports (5 s or more); with
# capfd, what a native library writes to stderr (HDF5, the JPEG decoder) is seen there too.
IN_OWN_PROCESS = ("negatives_unknown", "all_pairs_unreadable")


def _case_args(name, folders):
    """The command line of the bad-input case `name`, its folders filled in."""
    args = BAD_INPUT_CASES[name][0]
    args = [arg.format(**folders) if arg.startswith("{") else arg for arg in args]
    if "--output-dir" not in args:
        args += ["--output-dir", f"out_{name}"]
    return args


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory):
    """`(root, folders, results)`: the cases' folders, and the IN_OWN_PROCESS cases run."""
    root = tmp_path_factory.mktemp("bad_input")
    folders = _make_case_folders(root)

    def run_case(name):
        return name, helpers.run(TRIPLET, _case_args(name, folders), root)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run_case, IN_OWN_PROCESS))
    return root, folders, results


def _bad_input_result(bad_input, case, capfd):
    """The finished case: from its own process (IN_OWN_PROCESS) or from `main()` here."""
    root, folders, results = bad_input
    if case in results:
        return results[case]
    return helpers.run_main(tll, _case_args(case, folders), root, capfd)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_INPUT_CASES))
def test_bad_input_is_one_clear_line_with_exit_code_2(bad_input, case, capfd):
    result = _bad_input_result(bad_input, case, capfd)
    helpers.assert_one_line_error(result, PROG, *BAD_INPUT_CASES[case][1], warnings=True)


@pytest.mark.slow
def test_bad_input_leaves_finished_run_and_names_unreadable_files(bad_input, capfd):
    root, _, results = bad_input
    # Refused (the test above checks how): the finished run is as it was.
    refused = _bad_input_result(bad_input, "output_dir_holds_finished_run", capfd)
    assert refused.returncode == 2, describe(refused)
    assert (root / "finished" / "metrics.json").read_text() == json.dumps({"dry_run": False})
    warnings = results["all_pairs_unreadable"].stderr
    for index in range(3):
        assert f"unreadable/left/{index:05d}.jpg is not a readable image" in warnings


# ---------------------------------------------------------------------------
# Odd files, corrupt files, Ctrl-C and --resume
# ---------------------------------------------------------------------------


def _make_odd_folder(root):
    """Generated pairs where some files are odd-but-valid and two are corrupt."""
    folder = synthetic.make_synthetic_dataset(root / "odd", pairs=26, image_size=48, seed=5)
    left = folder / "left"

    def replace(name, save, **options):
        with Image.open(left / f"{name}.jpg") as image:
            image = image.convert("RGB")
            image.load()
        (left / f"{name}.jpg").unlink()
        save(image, **options)

    replace("00000", lambda im: im.save(left / "00000.jpg", format="PNG"))
    replace("00001", lambda im: im.save(left / "00001.jpg", format="GIF"))
    replace("00002", lambda im: im.convert("L").save(left / "00002.jpg", format="JPEG"))
    replace("00003", lambda im: im.convert("CMYK").save(left / "00003.jpg", format="JPEG"))
    gray16 = lambda im: Image.fromarray(  # noqa: E731
        np.asarray(im.convert("L"), np.uint16) * 257
    ).save(left / "00004.png")
    replace("00004", gray16)
    exif = Image.Exif()
    exif[0x0112] = 8
    replace("00005", lambda im: im.save(left / "00005.jpg", exif=exif.tobytes()))
    replace("00006", lambda im: im.resize((1, 1)).save(left / "00006.jpg"))
    replace("00007", lambda im: im.resize((2000, 1500)).save(left / "00007.jpg"))
    truncated = (left / "00008.jpg").read_bytes()
    (left / "00008.jpg").write_bytes(truncated[: len(truncated) // 3])
    (folder / "right" / "00009.jpg").write_bytes(b"<html>not an image</html>")
    return folder


@pytest.mark.slow
def test_odd_files_train_corrupt_pairs_are_skipped_and_ctrl_c_resumes(tmp_path, capfd):
    folder = _make_odd_folder(tmp_path)
    args = [
        "--data-dir",
        folder,
        "--weights",
        "none",
        "--image-size",
        "32",
        "--epochs",
        "2",  # one before Ctrl-C, one after --resume
        "--batch-size",
        "4",
        "--no-plots",
        "--output-dir",
        "out",
    ]
    output_dir = tmp_path / "out"
    backup_written = output_dir / "backup" / "training_metadata.json"

    # First run: Ctrl-C (SIGINT) once the first epoch is backed up.
    process = helpers.start(TRIPLET, args, tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if backup_written.exists():
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    stopped = helpers.finish(process, 120)
    line = helpers.assert_one_line_error(stopped, PROG, "--resume", code=130, warnings=True)
    assert line.startswith(f"{PROG}: interrupted:"), line
    for name in ("left/00008.jpg", "right/00009.jpg"):
        assert f"{folder / name} is not a readable image" in stopped.stderr
    assert "Skipped 2 pairs" in stopped.stdout
    assert "26 image pairs" in stopped.stdout
    assert "19 training pairs, 5 validation pairs" in stopped.stdout
    assert (output_dir / "backup").is_dir()
    assert not (output_dir / "metrics.json").exists()

    # With --resume it continues from the last finished epoch and ends with 2 epochs. It
    # calls main() in this process: Ctrl-C needed a process of its own, resuming does not.
    resumed = helpers.run_main(tll, [*args, "--resume"], tmp_path, capfd)
    assert resumed.returncode == 0, describe(resumed)
    assert "Traceback" not in resumed.stderr
    assert "Epoch 1/2" not in resumed.stdout
    assert "Epoch 2/2" in resumed.stdout
    with open(output_dir / "history.csv", newline="") as stream:
        epochs = [row["epoch"] for row in csv.DictReader(stream)]
    assert epochs == ["0", "1"]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    assert metrics["skipped_pairs"] == ["00008.jpg", "00009.jpg"]
    split = json.loads((output_dir / "split.json").read_text())
    names = split["train"] + split["validation"]
    assert len(names) == 24 and "00008.jpg" not in names and "00009.jpg" not in names
    # The odd-but-valid files are in the data the model trained and validated on.
    assert {"00000.jpg", "00001.jpg", "00002.jpg", "00003.jpg", "00004.png"} <= set(names)
    assert {"00005.jpg", "00006.jpg", "00007.jpg"} <= set(names)
    assert sorted(os.listdir(output_dir)) == [
        "embedding.keras",
        "history.csv",
        "logs",
        "metrics.json",
        "settings.json",
        "similarities.csv",
        "split.json",
    ]
