"""mnist_siamese.py in two local processes under JAX, started by tools/launch_local_workers.py.

Two processes on this machine stand for two machines: each has its own CPU device, and they
exchange gradients over loopback with gloo, as they would over a network. Needs JAX; CI runs
this module in its environment with JAX and without TensorFlow (`.ci/run`).
"""

import csv
import json
import os
import pathlib
import signal
import sys
import threading
import time

import helpers
import pytest
from helpers import FIXTURE, MNIST, TOOLS, describe

pytest.importorskip("jax", reason="the multi-process path is JAX's (requirements-jax.txt)")

LAUNCHER = TOOLS / "launch_local_workers.py"
# 2,000 training images of the fixture (3,440 pairs): 54 steps of 64 pairs an epoch.
RUN = ["--data", FIXTURE, "--limit", "2000", "--batch-size", "64", "--no-plots", "--seed", "3"]
OUTPUTS = ("siamese_model.keras", "embedding_network.keras", "history.csv", "metrics.json")


def read_history(output_dir):
    with open(pathlib.Path(output_dir) / "history.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def launch(count, args, cwd):
    """Start the launcher with `count` processes of the script; output captured."""
    command = [sys.executable, MNIST, "--distribute", "multi-process", *args]
    return helpers.start(LAUNCHER, [count, "--grace", "20", "--", *command], cwd)


@pytest.fixture
def jax_backend(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    for name in ("JOB_ADDRESSES", "NUM_PROCESSES", "PROCESS_ID"):
        monkeypatch.delenv(f"KERAS_DISTRIBUTION_{name}", raising=False)


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(
    tmp_path, jax_backend, monkeypatch
):
    # The one-process run that two processes must reproduce: the same global batch and seed,
    # and the same two devices (the CPU split in two by XLA), so the same float32 sums.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    one = helpers.run(MNIST, [*RUN, "--epochs", "2", "--output-dir", "one"], tmp_path)
    assert one.returncode == 0, describe(one)
    assert one.stdout.startswith("Backend: jax. Device: CPU, DataParallel over 2 devices\n")
    monkeypatch.delenv("XLA_FLAGS")
    plain = helpers.run(MNIST, [*RUN, "--epochs", "1", "--output-dir", "plain"], tmp_path)
    assert plain.returncode == 0, describe(plain)
    two = helpers.finish(launch(2, [*RUN, "--epochs", "2", "--output-dir", "two"], tmp_path), 400)
    assert two.returncode == 0, describe(two)

    # Each process says where it is; only process 0 reports the run's results.
    for index in (0, 1):
        line = f"[{index}] Backend: jax. Device: CPU, DataParallel over 2 devices in 2 processes"
        assert line in two.stdout, describe(two)
    assert "[0] * Accuracy on test set: " in two.stdout
    assert "[1] * Accuracy" not in two.stdout and "[1] Saved" not in two.stdout
    # The run folder is complete, written by process 0; process 1 left nothing behind.
    output_dir = tmp_path / "two"
    for name in OUTPUTS:
        assert (output_dir / name).is_file(), name
    assert not (output_dir / "backup").exists() and not (output_dir / "process-1").exists()
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["backend"] == "jax"

    # Each process feeds its half of every global batch: the two processes compute what the
    # one process with two devices computes, the same sums in the same order. Seen here:
    # equal to the last digit; 1e-6 leaves room for a different CPU's kernels only. A
    # process feeding the wrong half, or a pair seen twice, moves the figures by percents.
    one_rows, two_rows = read_history(tmp_path / "one"), read_history(output_dir)
    assert [row["epoch"] for row in two_rows] == ["0", "1"]
    keys = ("loss", "val_loss", "accuracy", "val_accuracy")
    for one_row, two_row in zip(one_rows, two_rows, strict=True):
        for key in keys:
            expected = pytest.approx(float(one_row[key]), rel=1e-6)
            assert float(two_row[key]) == expected, (two_row["epoch"], key)
    # Against one device, only the order of the float32 sums differs (each device sums its
    # half, then the halves are added): 1e-7 relative, until a ReLU's input lies that close
    # to 0. Its sign can then differ, and with it one unit's gradient for one pair; RMSprop
    # scales that up, and the runs train apart from that step. So a CPU agrees (2e-7 on one)
    # or not: on another a first-layer input of 1.3e-7 flipped at the 11th step, which moved
    # the loss by 3e-3 and the val_loss by 2.4 % (the same batches and dropout masks: in
    # float64 the runs agree to 2e-15). No ReLU input comes within 1e-6 of 0 before the 5th
    # step; runs split earlier (weights nudged by 1e-7 to 1e-5) moved the loss by 7e-3 at
    # most and the val_loss by 5.7 %. A loss summed over the devices instead of averaged, in
    # training or in validation, is off by 2x.
    (plain_row,) = read_history(tmp_path / "plain")
    for key, tolerance in (("loss", 1e-2), ("val_loss", 0.1)):
        expected = pytest.approx(float(plain_row[key]), rel=tolerance)
        assert float(two_rows[0][key]) == expected, key


def process_of(index, output_dir):
    """The pid of the launched script process `index` writing to `output_dir` (Linux /proc)."""
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(output_dir).encode() in command and str(MNIST).encode() in command:
            if f"KERAS_DISTRIBUTION_PROCESS_ID={index}".encode() in environment:
                return int(entry.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds processes in /proc")
def test_a_killed_process_stops_the_others_and_the_run_resumes(tmp_path, jax_backend):
    output_dir = tmp_path / "run"
    args = [*RUN, "--epochs", "3", "--output-dir", output_dir]
    launcher = launch(2, args, tmp_path)
    lines, second_epoch = [], threading.Event()

    def watch():
        for line in launcher.stdout:
            lines.append(line)
            if line.startswith("[1] Epoch 2/3"):
                second_epoch.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert second_epoch.wait(300), "".join(lines)
        victim = process_of(1, output_dir)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        launcher.wait(120)
        stopped_after = time.monotonic() - killed_at
        stderr = launcher.stderr.read()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    watcher.join(10)
    result = f"stdout:\n{''.join(lines)[-3000:]}\nstderr:\n{stderr}"
    assert launcher.returncode != 0, result
    assert "[launcher] process 1 was killed by SIGKILL; stopping the others" in stderr, result
    # Process 0 stops within a bounded time (the launcher's 20 s grace at most), with one
    # line that says what happened and how to go on, and no traceback.
    assert stopped_after < 60, result
    assert "Traceback" not in stderr, result
    said = [line for line in stderr.splitlines() if line.startswith("[0] mnist_siamese.py: ")]
    assert len(said) == 1 and "--resume" in said[0], result
    assert not (output_dir / "metrics.json").exists()

    resumed = helpers.finish(launch(2, [*args, "--resume"], tmp_path), 400)
    assert resumed.returncode == 0, describe(resumed)
    # The first epoch came back from the backup and is not run again: epochs 2 and 3 run.
    assert "[0] Epoch 1/3" not in resumed.stdout and "[0] Epoch 2/3" in resumed.stdout
    assert [row["epoch"] for row in read_history(output_dir)] == ["0", "1", "2"]
    for name in OUTPUTS:
        assert (output_dir / name).is_file(), name
    assert not (output_dir / "process-1").exists()


def test_launcher_refuses_a_bad_command_line(tmp_path):
    for args, hint in ((["0", "--", "x"], "N must"), (["2"], "no command given")):
        result = helpers.run(LAUNCHER, args, tmp_path, timeout=60)
        assert result.returncode == 2 and hint in result.stderr, describe(result)
