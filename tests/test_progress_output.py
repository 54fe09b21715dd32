"""What a run shows while it works, and the TensorBoard logs it leaves.

Keras's progress bar on a terminal (a pseudo-terminal here), one line per epoch in a pipe;
long work (decoding, the trunk pass, embedding) as a bar or as a line every 5 %; the event
files under `logs/`, replaced by `--overwrite` and kept for a resumed run; the streamed
trunk features and embeddings, equal to those of the decoded images.
"""

import functools
import io
import os
import pathlib
import pty
import re
import select
import sys
import time

import helpers
import numpy as np
import pytest
from helpers import FIXTURE, MNIST

import mnist_siamese
import triplet_totally_looks_like as tll
from siamese_support import image_folders, progress, run_folder, stores, synthetic
from triplet_totally_looks_like import keras

BAR = "\u2501"  # the heavy horizontal line Keras draws its bars with
SIZE = 32  # ResNet50's smallest: the streamed and the decoded images compare at any size


in_process_threads = helpers.same_threads  # for `main()` in this process


class Terminal(io.StringIO):
    """Standard output that says it is a terminal, and keeps what is written to it."""

    def isatty(self):
        return True


def run_on_pseudo_terminal(args, cwd, timeout=300):
    """`python mnist_siamese.py ARGS` with a pseudo-terminal as its standard output.

    Returns the exit code, everything written to the terminal, and the standard error.
    """
    master, slave = pty.openpty()
    # Standard error goes to a file: a pipe nobody reads while the terminal is read could fill.
    stderr_path = pathlib.Path(cwd) / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        process = helpers.start(MNIST, args, cwd, stdout=slave, stderr=stderr)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        if not select.select([master], [], [], max(0.0, deadline - time.monotonic()))[0]:
            process.kill()
            process.wait()
            os.close(master)
            raise TimeoutError(f"mnist_siamese.py {args} ran past {timeout} s")
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the other side is closed: the script has ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    code = process.wait(timeout=timeout)
    return code, b"".join(chunks).decode(errors="replace"), stderr_path.read_text()


def event_files(output_dir, side):
    """The TensorBoard event files of `output_dir/logs/side`, by name."""
    return sorted(path.name for path in (output_dir / "logs" / side).glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------
# Training output: a bar on a terminal, a line per epoch in a pipe
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_training_shows_keras_progress_bar_on_a_terminal(tmp_path):
    # No plots: they go to files, not to the terminal.
    code, output, stderr = run_on_pseudo_terminal(
        ["--dry-run", "--no-plots", "--output-dir", tmp_path / "out"], tmp_path
    )
    assert code == 0, (output[-2000:], stderr)
    assert BAR in output, output[-2000:]
    # The bar redraws itself in place.
    assert "\r" in output.replace("\r\n", "\n") or "\b" in output, output[-2000:]
    assert "* Accuracy on test set: " in output, output[-2000:]


@pytest.mark.slow
def test_training_prints_one_line_per_epoch_in_a_pipe(tmp_path, capsys):
    # In this process (a subprocess would pay the imports): pytest's captured output is no
    # terminal either, and the script chooses from `isatty()` alone.
    args = ["--data", FIXTURE, "--limit", "600", "--no-plots", "--epochs", "2"]
    args += in_process_threads()
    result = helpers.run_main(mnist_siamese, [*args, "--output-dir", "out"], tmp_path, capsys)
    assert result.returncode == 0, helpers.describe(result)
    assert BAR not in result.stdout and "\b" not in result.stdout, result.stdout
    assert "\r" not in result.stdout, result.stdout
    lines = result.stdout.splitlines()
    for epoch in (1, 2):
        at = lines.index(f"Epoch {epoch}/2")
        assert re.match(r"\d+/\d+ - .*\bloss: [\d.e+-]+ .*val_loss: ", lines[at + 1]), lines


def test_fit_verbosity_follows_the_output(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert progress.fit_verbosity() == 2
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert progress.fit_verbosity() == 1


# ---------------------------------------------------------------------------
# Long work: a line every 5 % in a log, Keras's Progbar on a terminal
# ---------------------------------------------------------------------------


def test_progress_in_a_log_prints_a_line_every_5_percent(capsys):
    shown = progress.Progress("Trunk features", 100, quiet_seconds=0)
    for _ in range(100):
        shown.advance(1)
    lines = capsys.readouterr().out.splitlines()
    assert 1 < len(lines) <= 21, lines
    assert shown.lines == len(lines)
    pattern = r"Trunk features: (\d+)/100 images \((\d+) %, \d+ s\)"
    percents = [int(re.fullmatch(pattern, line)[2]) for line in lines]
    assert percents == sorted(percents) and percents[-1] == 100, lines
    assert lines[-1].startswith("Trunk features: 100/100 images (100 %")


def test_progress_in_a_log_counts_with_thousands_separators(capsys):
    shown = progress.Progress("Trunk features", 12_032, quiet_seconds=0)
    for _ in range(376):
        shown.advance(32)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 20, lines
    assert re.fullmatch(r"Trunk features: 6,016/12,032 images \(50 %, \d+ s\)", lines[9])
    assert lines[-1].startswith("Trunk features: 12,032/12,032 images (100 %, ")


def test_short_work_prints_nothing_in_a_log(capsys):
    shown = progress.Progress("Decoding images", 10)
    for _ in range(10):
        shown.advance(1)
    assert capsys.readouterr().out == ""


def test_progress_on_a_terminal_is_keras_progbar(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    shown = progress.Progress("Decoding images", 64)
    for _ in range(4):
        shown.advance(16)
    output = terminal.getvalue()
    assert output.startswith("Decoding images: 64 images\n"), output
    assert BAR in output and "64/64" in output, output


def test_predict_progress_in_a_log_and_on_a_terminal(monkeypatch, capsys):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    data = np.zeros((100, 3), np.float32)
    monkeypatch.setattr(progress, "default_quiet_seconds", 0)
    model.predict(data, batch_size=10, **progress.predict_progress("Embedding", 100, 10))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and BAR not in "".join(lines), lines
    assert lines[-1].startswith("Embedding: 100/100 images (100 %, "), lines

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    options = progress.predict_progress("Embedding", 100, 10)
    assert options["verbose"] == 1
    model.predict(data, batch_size=10, **options)
    assert terminal.getvalue().startswith("Embedding: 100 images\n")
    assert BAR in terminal.getvalue()


# ---------------------------------------------------------------------------
# Streamed, bounded image pipelines: the same features and embeddings
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    synthetic.make_synthetic_dataset(folder, pairs=10, image_size=80, seed=5)
    anchors, positives = image_folders.find_image_pairs(folder)
    return anchors + positives


def test_image_batches_are_bounded(image_files):
    loader = functools.partial(tll.preprocess_image, image_size=(SIZE, SIZE))
    dataset = stores.image_batches(image_files, loader, 4)
    assert dataset.options().autotune.enabled is False
    batches = list(dataset.as_numpy_iterator())
    assert [len(batch) for batch in batches] == [4, 4, 4, 4, 4]


@pytest.mark.slow
def test_streamed_features_and_embeddings_match_the_decoded_images(
    image_files, monkeypatch, capsys
):
    keras.utils.set_random_seed(1)
    loader = functools.partial(tll.preprocess_image, image_size=(SIZE, SIZE))
    embedding = tll.build_embedding_network((SIZE, SIZE), weights=None)
    trunk, _ = stores.split_at_layer(embedding, "resnet50", tll.first_trainable_layer)
    images = stores.decode_images_once(image_files, loader, (SIZE, SIZE), 8)
    monkeypatch.setattr(progress, "default_quiet_seconds", 0)
    (features,), _ = stores.cache_inputs([image_files], loader, (SIZE, SIZE), 8, trunk=trunk)
    said = capsys.readouterr().out.splitlines()
    assert said[-2].startswith("Trunk features: 20/20 images (100 %"), said
    assert said[-1].startswith("Cached the features of the frozen trunk of 20 images"), said

    expected = np.concatenate(
        [keras.ops.convert_to_numpy(trunk(images[i : i + 8])) for i in range(0, 20, 8)]
    )
    # The same images in the same order; the trunk may run as a traced function, whose
    # fused operations round differently from the eager call.
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)

    embedded = stores.embed_image_files(embedding, image_files, loader, 8, "Embedding the gallery")
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .startswith("Embedding the gallery: 20/20 images (100 %")
    )
    assert isinstance(embedded, np.ndarray) and embedded.shape == (20, 256)
    np.testing.assert_allclose(
        embedded, embedding.predict(images, batch_size=8, verbose=0), rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------------------
# TensorBoard logs
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_dry_run_writes_tensorboard_logs_that_overwrite_replaces(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    # In this process, on 600 digits, without plots: the logs are the callbacks' whatever
    # the run's size. Each writer's file name holds a number new in the process.
    args = ["--dry-run", "--limit", "600", "--no-plots", "--output-dir", "out"]
    args += in_process_threads()
    first = helpers.run_main(mnist_siamese, args, tmp_path, capsys)
    assert first.returncode == 0, helpers.describe(first)
    output_dir = tmp_path / "out"
    train, validation = event_files(output_dir, "train"), event_files(output_dir, "validation")
    assert len(train) == 1 and len(validation) == 1, list((output_dir / "logs").rglob("*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(output_dir / "logs" / "validation"))
    logged.Reload()
    assert "epoch_loss" in logged.Tags()["tensors"], logged.Tags()

    again = helpers.run_main(mnist_siamese, [*args, "--overwrite"], tmp_path, capsys)
    assert again.returncode == 0, helpers.describe(again)
    new_train = event_files(output_dir, "train")
    assert len(new_train) == 1 and new_train != train
    assert len(event_files(output_dir, "validation")) == 1


def test_overwrite_removes_only_the_event_files_and_resume_keeps_them(tmp_path):
    logs = tmp_path / "logs"
    for side in ("train", "validation"):
        (logs / side).mkdir(parents=True)
        (logs / side / "events.out.tfevents.1.host.1.0.v2").write_bytes(b"old")
    # An interrupted run's backup: resuming keeps its logs, to add to them.
    (tmp_path / "backup").mkdir()
    run_folder.prepare_output_dir(tmp_path, resume=True)
    assert len(event_files(tmp_path, "train")) == 1
    (logs / "notes.txt").write_text("mine")
    run_folder.prepare_output_dir(tmp_path, overwrite=True)
    assert sorted(path.name for path in logs.iterdir()) == ["notes.txt"]
    # A folder without a backup holds no run to add to: its event files go too.
    (logs / "notes.txt").unlink()
    (logs / "train").mkdir()
    (logs / "train" / "events.out.tfevents.2.host.1.0.v2").write_bytes(b"old")
    run_folder.prepare_output_dir(tmp_path)
    assert not logs.exists()


def test_training_callbacks_write_logs_unless_told_not_to(tmp_path):
    pytest.importorskip("tensorboard")
    names = [type(callback).__name__ for callback in run_folder.training_callbacks(tmp_path)]
    assert names == [
        "CSVLogger",
        "TensorBoardLogs",
        "InterruptSafeBackupAndRestore",
        "ResumedDraws",
        "EpochTimer",
    ]
    quiet = run_folder.training_callbacks(tmp_path, logs=False)
    assert [type(callback).__name__ for callback in quiet] == [
        "CSVLogger",
        "InterruptSafeBackupAndRestore",
        "ResumedDraws",
        "EpochTimer",
    ]
