"""triplet_totally_looks_like.py in two local processes under JAX, started by
tools/launch_local_workers.py.

Two processes on this machine stand for two machines, as in test_mnist_multi_process.py:
each feeds its half of every global batch, process 0 writes the run folder, and a process
that dies stops the other, whose `--resume` continues. Needs JAX; CI runs this module in its
environment with JAX and without TensorFlow (`.ci/run`).
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
from helpers import TOOLS, TRIPLET, describe

pytest.importorskip("jax", reason="the multi-process path is JAX's (requirements-jax.txt)")

LAUNCHER = TOOLS / "launch_local_workers.py"
# The dry run's 48 generated pairs at the smallest size ResNet50 takes, two epochs.
RUN = ["--dry-run", "--image-size", "32", "--epochs", "2", "--no-plots"]
OUTPUTS = ("embedding.keras", "history.csv", "similarities.csv", "metrics.json", "split.json")


def launch(count, args, cwd):
    """Start the launcher with `count` processes of the script; output captured."""
    command = [sys.executable, TRIPLET, "--distribute", "multi-process", *args]
    return helpers.start(LAUNCHER, [count, "--grace", "20", "--", *command], cwd)


@pytest.fixture
def jax_backend(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    for name in ("JOB_ADDRESSES", "NUM_PROCESSES", "PROCESS_ID"):
        monkeypatch.delenv(f"KERAS_DISTRIBUTION_{name}", raising=False)


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
        if str(output_dir).encode() in command and str(TRIPLET).encode() in command:
            if f"KERAS_DISTRIBUTION_PROCESS_ID={index}".encode() in environment:
                return int(entry.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds processes in /proc")
def test_two_processes_train_a_killed_one_stops_the_other_and_the_run_resumes(
    tmp_path, jax_backend
):
    output_dir = tmp_path / "run"
    args = [*RUN, "--output-dir", output_dir]
    launcher = launch(2, args, tmp_path)
    lines, second_epoch = [], threading.Event()

    def watch():
        for line in launcher.stdout:
            lines.append(line)
            if line.startswith("[1] Epoch 2/2"):
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
    stdout = "".join(lines)
    result = f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr}"
    # Both processes trained the first epoch, each placed in the run.
    for index in (0, 1):
        line = f"[{index}] Backend: jax. Device: CPU, DataParallel over 2 devices in 2 processes"
        assert line in stdout, result
    assert launcher.returncode != 0, result
    assert "[launcher] process 1 was killed by SIGKILL; stopping the others" in stderr, result
    # Process 0 stops within a bounded time, with one line that says what happened and how
    # to go on, and no traceback.
    assert stopped_after < 60, result
    assert "Traceback" not in stderr, result
    said = [line for line in stderr.splitlines() if line.startswith("[0] triplet_totally_")]
    assert len(said) == 1 and "--resume" in said[0], result
    assert not (output_dir / "metrics.json").exists()

    resumed = helpers.finish(launch(2, [*args, "--resume"], tmp_path), 400)
    assert resumed.returncode == 0, describe(resumed)
    # The first epoch came back from the backup and is not run again.
    assert "[0] Epoch 1/2" not in resumed.stdout and "[0] Epoch 2/2" in resumed.stdout
    with open(output_dir / "history.csv", newline="") as stream:
        assert [row["epoch"] for row in csv.DictReader(stream)] == ["0", "1"]
    # Process 0 wrote the run folder and reports; process 1 left nothing behind.
    assert "[0] * Triplet accuracy: " in resumed.stdout
    assert "[1] * Triplet" not in resumed.stdout and "[1] Saved" not in resumed.stdout
    for name in OUTPUTS:
        assert (output_dir / name).is_file(), name
    assert not (output_dir / "process-1").exists() and not (output_dir / "backup").exists()
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["replicas"] == 2 and metrics["epochs"] == 2, metrics
