"""mnist_siamese.py end to end, in subprocesses: --dry-run, reloading its models in a fresh
process, reruns into the same folder, seed determinism, the offline download failure,
Ctrl-C and --resume after a kill.

Every subprocess pays the TensorFlow import (about 5 s), so the dry run happens once per
module and the cheaper runs use --limit and --no-plots; independent runs go in parallel.
Where the process is not what is tested (a refused run, a rerun, a resume), `main()` runs
in this process instead.
"""

import csv
import json
import os
import pathlib
import re
import shutil
import signal
import textwrap

import helpers
import numpy as np
import pytest
from helpers import FIXTURE, MNIST, describe

# Imported before any test: the first import sets process-wide settings (see conftest.py).
import mnist_siamese

# Every test starts the script, and most of them train: all are in the slow lane.
pytestmark = pytest.mark.slow
PROG = "mnist_siamese.py"
DRY_RUN_DIR = pathlib.Path("runs") / "mnist_siamese_dry_run"
METRIC_KEYS = (
    "train_accuracy",
    "test_accuracy",
    "test_roc_auc",
    "best_threshold",
    "best_threshold_accuracy",
    "epochs",
    "seconds_per_epoch",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A cheap real training run: 600 training and 600 test images of the fixture.
SMALL_RUN = ["--data", str(FIXTURE), "--limit", "600", "--no-plots"]
# For a run in this process as well as in a subprocess (`helpers.same_threads`).
SAME_THREADS = helpers.same_threads()


def read_history(output_dir):
    with open(pathlib.Path(output_dir) / "history.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def read_metrics(output_dir):
    return json.loads((pathlib.Path(output_dir) / "metrics.json").read_text())


def accuracy_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("* Accuracy")]


# ---------------------------------------------------------------------------
# --dry-run end to end, once per module
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """`python mnist_siamese.py --dry-run` from an empty working directory."""
    cwd = tmp_path_factory.mktemp("dry_run")
    result = helpers.run(MNIST, ["--dry-run"], cwd, timeout=600)
    assert result.returncode == 0, describe(result)
    return cwd, result


def test_dry_run_output_lines(dry_run):
    cwd, result = dry_run
    lines = result.stdout.strip().splitlines()
    # The first line names the Keras backend (the one this test runs under) and the device.
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    assert re.match(rf"Backend: {backend}\. Device: (CPU|GPU)", lines[0]), lines[0]
    assert re.fullmatch(r"\* Accuracy on training set: \d{1,3}\.\d\d%", lines[-2]), lines[-2]
    assert re.fullmatch(r"\* Accuracy on test set: \d{1,3}\.\d\d%", lines[-1]), lines[-1]
    assert "Traceback" not in result.stderr
    # The printed figures are the ones saved in metrics.json.
    metrics = read_metrics(cwd / DRY_RUN_DIR)
    assert lines[-2].endswith(f"{100 * metrics['train_accuracy']:0.2f}%")
    assert lines[-1].endswith(f"{100 * metrics['test_accuracy']:0.2f}%")


def test_dry_run_stderr_is_quiet(dry_run):
    # A successful run should not alarm the user: no TensorFlow start-up log lines and
    # no warnings (for example Keras's "Your input ran out of data" about the dataset).
    _, result = dry_run
    assert result.stderr.strip() == "", result.stderr


def test_dry_run_writes_its_files(dry_run):
    cwd, _ = dry_run
    output_dir = cwd / DRY_RUN_DIR
    names = {path.name for path in output_dir.iterdir()}
    expected = {
        "siamese_model.keras",
        "embedding_network.keras",
        "history.csv",
        "metrics.json",
        "training_curves.png",
        "distance_histogram.png",
        "pairs.png",
        "embedding_map.png",
    }
    assert expected <= names, names
    assert not [name for name in names if name.startswith(".tmp-")], names
    assert "backup" not in names  # the finished run's training backup is cleaned up
    assert sorted(path.name for path in cwd.iterdir()) == ["runs"]  # nothing outside
    for name in ("training_curves.png", "distance_histogram.png", "pairs.png", "embedding_map.png"):
        content = (output_dir / name).read_bytes()
        assert content.startswith(PNG_SIGNATURE), name
        assert content.rstrip().endswith(b"IEND\xaeB`\x82"), name  # complete, not truncated
        assert len(content) > 2000, name
    for name in ("siamese_model.keras", "embedding_network.keras"):
        assert (output_dir / name).read_bytes()[:2] == b"PK", name  # a zip archive


def test_dry_run_history_and_metrics(dry_run):
    cwd, result = dry_run
    output_dir = cwd / DRY_RUN_DIR
    history = read_history(output_dir)
    assert len(history) == 1
    assert history[0]["epoch"] == "0"
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert np.isfinite(float(history[0][key])), key

    metrics = read_metrics(output_dir)
    assert set(METRIC_KEYS) <= set(metrics), metrics
    for key in ("train_accuracy", "test_accuracy", "test_roc_auc", "best_threshold_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert metrics["epochs"] == 1
    assert metrics["seconds_per_epoch"] > 0
    assert metrics["epoch_seconds"] == [pytest.approx(metrics["seconds_per_epoch"], abs=1e-4)]
    assert metrics["steps_per_execution"] == 32  # the default, on an epoch of 271 steps
    assert metrics["best_threshold"] > 0
    assert metrics["test_accuracy"] >= 0.75, metrics
    # The MLP on a machine without a GPU runs one thread per operation (measured faster);
    # the setting is TensorFlow's, and under another backend there is none.
    assert metrics["backend"] == os.environ.get("KERAS_BACKEND", "tensorflow")
    expected_threads = 1 if "Device: CPU" in result.stdout.splitlines()[0] else 0
    if metrics["backend"] != "tensorflow":
        expected_threads = None
    assert metrics["intra_op_threads"] == expected_threads, metrics
    # The validation accuracy Keras logged is the same threshold on the same test pairs
    # (but with dropout off in both): it must agree with the final test accuracy.
    assert float(history[0]["val_accuracy"]) == pytest.approx(metrics["test_accuracy"], abs=2e-3)


RELOAD = textwrap.dedent(
    """
    import json, pathlib, sys
    import mnist_siamese
    import keras
    import numpy as np
    from siamese_support import evaluation, mnist_data

    output_dir, data, seed = pathlib.Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    # Default safe mode: this fails if the saved graph holds a Python lambda.
    siamese = keras.saving.load_model(output_dir / "siamese_model.keras")
    embedding = keras.saving.load_model(output_dir / "embedding_network.keras")

    # The test pairs of the run: the same seed drives one generator for the training
    # pairs, then the test pairs.
    (x_train, y_train), (x_test, y_test) = mnist_data.load_mnist(data)
    rng = np.random.default_rng(seed)
    mnist_siamese.create_pairs(x_train, [np.where(y_train == d)[0] for d in range(10)], rng)
    pairs, labels = mnist_siamese.create_pairs(
        x_test, [np.where(y_test == d)[0] for d in range(10)], rng
    )
    image_a = x_test[pairs[:, 0]].astype("float32") / 255.0
    image_b = x_test[pairs[:, 1]].astype("float32") / 255.0
    distances = siamese.predict([image_a, image_b], batch_size=256, verbose=0).ravel()
    embedding_a = embedding.predict(image_a, batch_size=256, verbose=0)
    embedding_b = embedding.predict(image_b, batch_size=256, verbose=0)
    inner = siamese.get_layer("base_network").predict(image_a, batch_size=256, verbose=0)
    loss = siamese.loss
    print(json.dumps({
        "pairs": len(pairs),
        "distances": distances.tolist(),
        "embedding_distances": np.sqrt(np.maximum(
            ((embedding_a - embedding_b) ** 2).sum(axis=1), keras.config.epsilon()
        )).tolist(),
        "embedding_difference": float(np.abs(inner - embedding_a).max()),
        "embedding_size": int(embedding_a.shape[1]),
        "accuracy": mnist_siamese.compute_accuracy(labels, distances),
        "roc_auc": evaluation.roc_auc(labels, distances),
        "loss": type(loss).__name__,
        "margin": getattr(loss, "margin", None),
    }))
    """
)


def test_dry_run_models_reload_in_a_fresh_process(dry_run):
    cwd, _ = dry_run
    output_dir = cwd / DRY_RUN_DIR
    metrics = read_metrics(output_dir)
    result = helpers.run(MNIST, [output_dir, FIXTURE, 42], cwd, python_code=RELOAD)
    assert result.returncode == 0, describe(result)
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])

    assert reloaded["pairs"] == metrics["test_pairs"]
    distances = np.array(reloaded["distances"])
    assert np.all(np.isfinite(distances)) and distances.min() > 0
    # The Siamese model's distance is the distance between the embedding network's outputs,
    # and the base network inside the Siamese model is the saved embedding network.
    np.testing.assert_allclose(distances, reloaded["embedding_distances"], rtol=1e-4, atol=1e-5)
    assert reloaded["embedding_difference"] < 1e-5
    assert reloaded["embedding_size"] == 128
    # The reloaded model reproduces the run's own test figures on its test pairs.
    assert abs(reloaded["accuracy"] - metrics["test_accuracy"]) <= 1.0 / reloaded["pairs"]
    assert reloaded["roc_auc"] == pytest.approx(metrics["test_roc_auc"], abs=1e-3)
    # The compiled loss comes back with its margin.
    assert reloaded["loss"] == "ContrastiveLoss"
    assert reloaded["margin"] == pytest.approx(1.0)


def test_dry_run_replaces_a_dry_run_but_a_real_run_is_refused(dry_run, tmp_path, capsys):
    source, _ = dry_run
    shutil.copytree(source / "runs", tmp_path / "runs")
    output_dir = tmp_path / DRY_RUN_DIR
    before = (output_dir / "metrics.json").read_bytes()
    before_model = (output_dir / "siamese_model.keras").read_bytes()

    # A real (non-dry) run into the dry run's folder, without --overwrite: refused.
    arguments = [*SMALL_RUN, "--epochs", "1", "--output-dir", DRY_RUN_DIR, *SAME_THREADS]
    refused = helpers.run_main(mnist_siamese, arguments, tmp_path, capsys)
    helpers.assert_one_line_error(refused, PROG, "--overwrite")
    assert (output_dir / "metrics.json").read_bytes() == before
    assert (output_dir / "siamese_model.keras").read_bytes() == before_model

    # Another dry run (smaller, to save time) replaces the first one.
    arguments = ["--dry-run", "--limit", "600", "--no-plots", *SAME_THREADS]
    again = helpers.run_main(mnist_siamese, arguments, tmp_path, capsys)
    assert again.returncode == 0, describe(again)
    metrics = read_metrics(output_dir)
    assert metrics["epochs"] == 1
    assert metrics["dry_run"] is True
    assert metrics["training_pairs"] < json.loads(before)["training_pairs"]  # really new
    assert len(read_history(output_dir)) == 1
    names = [path.name for path in output_dir.iterdir()]
    assert "backup" not in names and not [n for n in names if n.startswith(".tmp-")]


# ---------------------------------------------------------------------------
# Seed determinism
# ---------------------------------------------------------------------------


def test_same_seed_same_accuracies(tmp_path):
    args = [*SMALL_RUN, "--epochs", "1", "--seed", "7", "--output-dir"]
    runs = [helpers.start(MNIST, [*args, name], tmp_path) for name in ("first", "second")]
    first, second = (helpers.finish(process) for process in runs)
    assert first.returncode == 0, describe(first)
    assert second.returncode == 0, describe(second)
    assert len(accuracy_lines(first.stdout)) == 2
    assert accuracy_lines(first.stdout) == accuracy_lines(second.stdout)
    assert read_history(tmp_path / "first") == read_history(tmp_path / "second")
    first_metrics, second_metrics = (
        read_metrics(tmp_path / "first"),
        read_metrics(tmp_path / "second"),
    )
    for key in ("train_accuracy", "test_accuracy", "test_roc_auc", "best_threshold"):
        assert first_metrics[key] == second_metrics[key], key
    assert first_metrics["seed"] == 7


# ---------------------------------------------------------------------------
# No network
# ---------------------------------------------------------------------------

OFFLINE = textwrap.dedent(
    """
    import pathlib, sys, urllib.error
    import mnist_siamese  # first: its import silences TensorFlow's start-up logs
    from keras.src.utils import file_utils

    marker = pathlib.Path("download-attempted")

    def no_network(*args, **kwargs):
        marker.write_text(str(args[0]))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    file_utils.urlretrieve = no_network
    sys.exit(mnist_siamese.main(sys.argv[2:]))
    """
)


def test_failed_download_names_the_offline_options(tmp_path):
    keras_home = tmp_path / "keras_home"
    keras_home.mkdir()
    args = ["--epochs", "1", "--output-dir", "out"]
    env = {"KERAS_HOME": str(keras_home)}
    process = helpers.run(MNIST, args, tmp_path, python_code=OFFLINE, env=env)
    helpers.assert_one_line_error(process, PROG, "--data", "--dry-run")
    # Keras's real get_file ran and tried the download (through our stub, not the network).
    assert "mnist" in (tmp_path / "download-attempted").read_text()
    assert not (tmp_path / "out").exists()  # nothing written for a run that never started
    leftovers = [p for p in keras_home.rglob("*") if p.is_file()]
    assert not [p for p in leftovers if "mnist" in p.name], leftovers


# ---------------------------------------------------------------------------
# Ctrl-C and --resume
# ---------------------------------------------------------------------------

# Runs main() with one Keras callback hook wrapped to stop the process at a chosen point.
INTERRUPTER = textwrap.dedent(
    """
    import os, signal, sys
    import mnist_siamese
    import keras

    how = sys.argv[2]
    BackupAndRestore = keras.callbacks.BackupAndRestore

    if how == "kill-after-backup":
        # SIGKILL right after the training state of epoch 0 is backed up, before any
        # other callback sees the end of that epoch.
        original = BackupAndRestore.on_epoch_end

        def on_epoch_end(self, epoch, logs=None):
            original(self, epoch, logs)
            if epoch == 0:
                os.kill(os.getpid(), signal.SIGKILL)

        BackupAndRestore.on_epoch_end = on_epoch_end
    elif how == "ctrl-c-after-epoch":
        # Ctrl-C once epoch 0 is completely finished (every callback has seen its end).
        original = BackupAndRestore.on_epoch_begin

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                signal.raise_signal(signal.SIGINT)
            original(self, epoch, logs)

        BackupAndRestore.on_epoch_begin = on_epoch_begin
    sys.exit(mnist_siamese.main(sys.argv[3:]))
    """
)
RESUMABLE_RUN = ["--data", str(FIXTURE), "--limit", "1000", "--epochs", "3", "--no-plots"]
RESUMABLE_RUN += ["--output-dir", "run", "--resume", *SAME_THREADS]


def assert_resumed_to_three_epochs(result, output_dir):
    assert result.returncode == 0, describe(result)
    history = read_history(output_dir)
    assert [row["epoch"] for row in history] == ["0", "1", "2"], history
    assert read_metrics(output_dir)["epochs"] == 3
    assert not (output_dir / "backup").exists()
    assert "Epoch 1/3" not in result.stdout  # continued, did not start over
    assert "Epoch 3/3" in result.stdout


def test_resume_after_a_kill_right_after_the_backup(tmp_path, capsys):
    killed = helpers.run(MNIST, ["kill-after-backup", *RESUMABLE_RUN], tmp_path, INTERRUPTER)
    assert killed.returncode == -signal.SIGKILL, describe(killed)
    output_dir = tmp_path / "run"
    assert (output_dir / "backup").is_dir()
    assert not (output_dir / "metrics.json").exists()

    # The same command again (it has --resume), without the hook, in this process.
    resumed = helpers.run_main(mnist_siamese, RESUMABLE_RUN, tmp_path, capsys)
    assert_resumed_to_three_epochs(resumed, output_dir)


def test_ctrl_c_saves_a_resumable_run(tmp_path, capsys):
    interrupted = helpers.run(MNIST, ["ctrl-c-after-epoch", *RESUMABLE_RUN], tmp_path, INTERRUPTER)
    assert interrupted.returncode == 130, describe(interrupted)
    assert "Traceback" not in interrupted.stderr, describe(interrupted)
    message = interrupted.stderr.strip().splitlines()[-1]
    assert message.startswith(f"{PROG}: ") and "--resume" in message, describe(interrupted)
    output_dir = tmp_path / "run"
    assert (output_dir / "backup").is_dir()
    assert not (output_dir / "metrics.json").exists()
    assert not accuracy_lines(interrupted.stdout)

    # Without --resume (or --overwrite) the interrupted run is left alone.
    without_resume = [arg for arg in RESUMABLE_RUN if arg != "--resume"]
    refused = helpers.run_main(mnist_siamese, without_resume, tmp_path, capsys)
    helpers.assert_one_line_error(refused, PROG, "--resume", "--overwrite")
    assert (output_dir / "backup").is_dir()

    resumed = helpers.run_main(mnist_siamese, RESUMABLE_RUN, tmp_path, capsys)
    assert_resumed_to_three_epochs(resumed, output_dir)

    # Checked last, so that the steps above are known to work whatever happens here:
    # Ctrl-C prints exactly one line on stderr, nothing else.
    helpers.assert_one_line_error(interrupted, PROG, "--resume", code=130)
