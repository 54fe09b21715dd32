"""What a run records of what made it, resuming under another backend, the launcher's Ctrl-C.

- `metrics.json` and `settings.json` record the Keras backend, the versions of Python,
  Keras, the backend's library and NumPy, and the device (`devices.provenance`). They are
  recorded, never checked: a resume under another backend says so in one line and goes on.
- `tools/launch_local_workers.py`, on Ctrl-C or SIGTERM, passes the signal on, lets each
  process stop by itself, then says so in one line of its own and exits with 130 (143).
- A multi-process run stopped early leaves no folder that it made and did not use: the
  other processes take their folders only once process 0 holds the run's, and whichever
  process ends last removes the folders the run made, if they are empty.

CI runs this module in both environments: with TensorFlow, and with JAX alone (`.ci/run`),
where the parts that need TensorFlow are skipped.
"""

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import filelock
import helpers
import keras
import numpy as np
import pytest
from helpers import FIXTURE, MNIST, REPOSITORY, TOOLS, describe

import mnist_siamese
from siamese_support import devices, run_folder

LAUNCHER = TOOLS / "launch_local_workers.py"
# The MNIST fixture's first 600 images of each set, one epoch: a run of a few seconds.
SMALL_RUN = ["--data", FIXTURE, "--limit", "600", "--no-plots", "--seed", "5"]
NOTICE = "Resuming a run made with {} under {}: its figures may differ from an uninterrupted run's"


def made_with(backend, device="CPU"):
    """A provenance record as `devices.provenance` writes it, for the unit tests."""
    versions = {"python": "3.11.7", "keras": "3.15.1", backend: "1.0", "numpy": "2.0.0"}
    return {"backend": backend, "versions": versions, "device": device, "device_count": 1}


def interrupted_run_folder(folder, settings):
    """`folder` as an interrupted run leaves it: a finished epoch's backup, its settings.json."""
    (folder / "backup").mkdir(parents=True)
    (folder / "backup" / "training_metadata.json").write_text('{"epoch": 0}')
    (folder / "settings.json").write_text(json.dumps(settings))


# ---------------------------------------------------------------------------
# What made a run
# ---------------------------------------------------------------------------


def test_provenance_names_the_backend_its_versions_and_the_device():
    record = devices.provenance()
    backend = keras.backend.backend()
    libraries = {"tensorflow": ["tensorflow"], "jax": ["jax", "jaxlib"], "torch": ["torch"]}
    assert record["backend"] == backend
    assert set(record["versions"]) == {"python", "keras", "numpy", *libraries[backend]}
    assert record["versions"]["keras"] == keras.version()
    assert record["versions"]["numpy"] == np.__version__
    for library in libraries[backend]:
        assert record["versions"][library] == importlib.import_module(library).__version__
    assert record["device_count"] >= 1
    if devices.accelerator_visible():  # the GPU's own name, such as "NVIDIA H100 80GB HBM3"
        assert record["device"] and "CPU" not in record["device"], record
    else:
        assert record["device"] == "CPU", record
    assert json.loads(json.dumps(record)) == record  # it goes into JSON files as it is


@pytest.mark.slow
def test_a_small_mnist_run_records_what_made_it(tmp_path, capsys):
    args = [*SMALL_RUN, "--epochs", "1", "--output-dir", tmp_path / "run"]
    if keras.backend.backend() == "tensorflow":
        args += ["--intra-op-threads", "0"]  # TensorFlow's setting for this process, as it is
    result = helpers.run_main(mnist_siamese, args, tmp_path, capsys)
    assert result.returncode == 0, describe(result)
    assert "Resuming" not in result.stdout
    expected = devices.provenance()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    for record in (metrics, settings):
        assert {key: record[key] for key in expected} == expected
        assert "earlier_backends" not in record
    assert metrics["test_accuracy"] > 0.5  # the figures it records beside


def test_a_resume_under_another_backend_is_said_and_recorded_never_refused(tmp_path):
    interrupted_run_folder(tmp_path, {"margin": 0.5, **made_with("tensorflow")})
    jax_on_a_gpu = made_with("jax", "NVIDIA H100 80GB HBM3")
    provenance, notice = run_folder.resumed_provenance(tmp_path, jax_on_a_gpu)
    assert notice == NOTICE.format("tensorflow", "jax")
    assert provenance == {**jax_on_a_gpu, "earlier_backends": ["tensorflow"]}

    # Another backend, versions and device: recorded, not a reason to refuse.
    run_folder.check_same_settings(tmp_path, {"margin": 0.5}, provenance)
    written = json.loads((tmp_path / "settings.json").read_text())
    assert written == {"margin": 0.5, **provenance}
    # A setting a resume must keep is still checked.
    with pytest.raises(ValueError, match=r"--margin 0\.5 -> 0\.2"):
        run_folder.check_same_settings(tmp_path, {"margin": 0.2}, provenance)

    # Resumed again under JAX: both earlier stretches stay recorded.
    provenance, notice = run_folder.resumed_provenance(tmp_path, jax_on_a_gpu)
    assert notice == NOTICE.format("tensorflow and jax", "jax")
    assert provenance["earlier_backends"] == ["tensorflow", "jax"]


def test_a_resume_under_the_same_backend_says_nothing(tmp_path):
    interrupted_run_folder(tmp_path / "same", made_with("jax"))
    newer = made_with("jax", "NVIDIA H100 80GB HBM3")
    newer["versions"]["jax"] = "2.0"
    assert run_folder.resumed_provenance(tmp_path / "same", newer) == (newer, None)
    # Without a finished epoch's backup there is nothing to resume, whatever was recorded.
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "settings.json").write_text(json.dumps(made_with("tensorflow")))
    assert run_folder.resumed_provenance(tmp_path / "fresh", newer) == (newer, None)


# Ctrl-C once the first epoch is backed up (the backup holds the signal until it is saved).
CTRL_C_AFTER_FIRST_EPOCH = textwrap.dedent(
    """
    import signal, sys
    import mnist_siamese
    import keras

    save = keras.callbacks.BackupAndRestore.on_epoch_end

    def save_then_ctrl_c(self, epoch, logs=None):
        save(self, epoch, logs)
        if epoch == 0:
            signal.raise_signal(signal.SIGINT)

    keras.callbacks.BackupAndRestore.on_epoch_end = save_then_ctrl_c
    sys.exit(mnist_siamese.main(sys.argv[2:]))
    """
)


@pytest.mark.slow
@helpers.needs("tensorflow", "jax")
def test_a_run_interrupted_under_tensorflow_resumes_under_jax(tmp_path):
    args = [*SMALL_RUN, "--epochs", "2", "--output-dir", "run"]
    tensorflow = {"KERAS_BACKEND": "tensorflow"}
    interrupted = helpers.run(MNIST, args, tmp_path, CTRL_C_AFTER_FIRST_EPOCH, tensorflow)
    helpers.assert_one_line_error(interrupted, "mnist_siamese.py", "--resume", code=130)
    output_dir = tmp_path / "run"
    assert json.loads((output_dir / "settings.json").read_text())["backend"] == "tensorflow"

    resumed = helpers.run(MNIST, [*args, "--resume"], tmp_path, env={"KERAS_BACKEND": "jax"})
    assert resumed.returncode == 0, describe(resumed)
    lines = resumed.stdout.splitlines()
    assert lines.count(NOTICE.format("tensorflow", "jax")) == 1, describe(resumed)
    assert not [line for line in lines if line.startswith("Resuming") and "figures" not in line]
    assert "Epoch 1/2" not in resumed.stdout and "Epoch 2/2" in resumed.stdout  # went on
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["backend"] == "jax"
    assert metrics["earlier_backends"] == ["tensorflow"]
    assert {"jax", "jaxlib"} <= set(metrics["versions"]) and "tensorflow" not in metrics["versions"]
    assert metrics["test_accuracy"] > 0.5


# ---------------------------------------------------------------------------
# The folders of a multi-process run stopped early
# ---------------------------------------------------------------------------


def test_another_process_takes_no_folder_before_the_run_has_joined(tmp_path):
    # Process 1 enters its run before JAX's join; process 0 may not have made the folder yet.
    with run_folder.Run(tmp_path / "new" / "run", False, False, True, place=(1, 2)):
        assert list(tmp_path.iterdir()) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("last", [0, 1], ids=["process-0-ends-last", "process-1-ends-last"])
def test_the_process_that_ends_last_removes_the_folders_the_run_made(tmp_path, last):
    output_dir = tmp_path / "new" / "run"
    holds = [run_folder.exclusive_use(output_dir, (index, 2)) for index in (0, 1)]
    for hold in holds:  # process 0 first: process 1 takes its folder once the run has joined
        hold.__enter__()
    assert (output_dir / "process-1" / ".lock").exists()
    for hold in (holds[1 - last], holds[last]):
        hold.__exit__(None, None, None)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_the_user_made_stays_empty_or_not(tmp_path):
    empty, with_notes = tmp_path / "empty", tmp_path / "notes"
    empty.mkdir()
    with_notes.mkdir()
    (with_notes / "notes.txt").write_text("mine")
    for output_dir in (empty, with_notes):
        holds = [run_folder.exclusive_use(output_dir, (index, 2)) for index in (0, 1)]
        for hold in holds:
            hold.__enter__()
        for hold in holds:  # process 0 ends first, process 1 last
            hold.__exit__(None, None, None)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty", "notes"]
    assert list(empty.iterdir()) == []
    assert [path.name for path in with_notes.iterdir()] == ["notes.txt"]


# A Ctrl-C raised where Python cannot raise it (a garbage collector's callback, as JAX has).
LOST_CTRL_C = textwrap.dedent(
    """
    import gc, os, signal, sys, time
    from siamese_support import command_line

    if sys.argv[1] == "script":  # what a script does first thing
        command_line.quiet_interrupts_outside_main("__main__", "probe")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as while main() runs
    fired = []

    def collecting(phase, info):
        if not fired:
            fired.append(phase)
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100_000):  # the handler runs here, in the callback
                pass

    gc.callbacks.append(collecting)
    gc.collect()
    gc.callbacks.remove(collecting)
    try:
        for _ in range(200):  # delivered again after 0.05 s
            time.sleep(0.01)
        print("lost")
    except KeyboardInterrupt:
        print("delivered")
    """
)


@pytest.mark.parametrize("how", ["script", "plain"])
def test_a_ctrl_c_python_drops_is_delivered_again(tmp_path, how):
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    result = subprocess.run(
        [sys.executable, "-c", LOST_CTRL_C, how],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=helpers.default_signal_handling,
    )
    assert result.returncode == 0, describe(result)
    # Plain Python loses it (which shows that the probe reaches the case); a script does not.
    assert result.stdout == ("delivered\n" if how == "script" else "lost\n"), describe(result)
    if how == "script":
        assert result.stderr == "", describe(result)


# ---------------------------------------------------------------------------
# The launcher's Ctrl-C
# ---------------------------------------------------------------------------

# A process that says it is ready and waits; Ctrl-C ends it as the scripts end: one line, 130.
WAITING = textwrap.dedent(
    """
    import signal, sys, time
    if sys.argv[1:] == ["ignore"]:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # from before it says it is ready, when a test may send the signal
        print("ready", flush=True)
        time.sleep(120)
    except KeyboardInterrupt:
        print("waiting.py: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    """
)


def launch_ready(tmp_path, count, child_args=(), grace=20, new_session=False):
    """Start the launcher with `count` WAITING processes; return it once all are ready.

    `new_session`: in a process group of its own, as a terminal's foreground job, so that
    a test can signal the whole group.
    """
    command = [sys.executable, str(LAUNCHER), str(count), "--grace", str(grace), "--"]
    command += [sys.executable, "-c", WAITING, *child_args]
    launcher = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=helpers.default_signal_handling,
        start_new_session=new_session,
    )
    ready, lines = threading.Event(), []

    def watch():
        for line in launcher.stdout:
            lines.append(line)
            if sum(line.endswith("] ready\n") for line in lines) == count:
                ready.set()

    threading.Thread(target=watch, daemon=True).start()
    if not ready.wait(60):
        launcher.kill()
        pytest.fail(f"the processes did not start: {''.join(lines)}{launcher.stderr.read()}")
    return launcher


@pytest.mark.parametrize(
    ("signum", "whom", "code", "word"),
    [
        (signal.SIGINT, "launcher", 130, "interrupted"),
        (signal.SIGINT, "process group", 130, "interrupted"),
        (signal.SIGTERM, "launcher", 143, "terminated"),
    ],
)
def test_the_launcher_says_it_was_interrupted_in_one_line(tmp_path, signum, whom, code, word):
    launcher = launch_ready(tmp_path, 2, new_session=whom == "process group")
    if whom == "process group":  # Ctrl-C on a terminal signals the foreground job's group
        os.killpg(launcher.pid, signum)
    else:
        launcher.send_signal(signum)
    stderr = launcher.stderr.read()
    assert launcher.wait(30) == code, stderr
    lines = stderr.splitlines()
    # Each process's own line first, then the launcher's, and nothing else: the
    # processes' exit codes are the interrupt's, not failures to report.
    assert lines[-1] == f"[launcher] {word}: stopped the 2 processes", stderr
    if signum == signal.SIGINT:
        assert sorted(lines[:-1]) == [f"[{index}] waiting.py: interrupted" for index in (0, 1)]
    else:  # SIGTERM ends these processes silently
        assert lines[:-1] == [], stderr


def test_a_process_that_ignores_ctrl_c_is_stopped_after_the_grace(tmp_path):
    launcher = launch_ready(tmp_path, 1, ["ignore"], grace=1)
    started = time.monotonic()
    launcher.send_signal(signal.SIGINT)
    stderr = launcher.stderr.read()
    assert launcher.wait(30) == 130, stderr
    assert time.monotonic() - started < 15  # the grace, then SIGTERM: no waiting for it
    assert stderr.splitlines() == ["[launcher] interrupted: stopped the 1 process"], stderr


@pytest.mark.slow
@pytest.mark.jax_only
@helpers.needs("jax")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo's CPU collectives")
def test_ctrl_c_while_two_processes_start_training_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    for name in ("JOB_ADDRESSES", "NUM_PROCESSES", "PROCESS_ID"):
        monkeypatch.delenv(f"KERAS_DISTRIBUTION_{name}", raising=False)
    output_dir = tmp_path / "new" / "run"
    # Batches of 2 pairs: the first epoch is far from its backup when the Ctrl-C comes.
    args = ["--data", FIXTURE, "--limit", "2000", "--batch-size", "2", "--no-plots"]
    command = [sys.executable, MNIST, "--distribute", "multi-process", *args]
    command += ["--output-dir", output_dir]
    launcher = helpers.start(LAUNCHER, ["2", "--grace", "20", "--", *command], tmp_path)
    # Both processes have joined and hold their folders: process 0 made the run's folder
    # and its parent; process 1 its own inside. Whichever stops last removes them.
    deadline = time.monotonic() + 240
    while not (output_dir / "process-1" / ".lock").exists():
        assert launcher.poll() is None, describe(helpers.finish(launcher))
        assert time.monotonic() < deadline, "process 1 did not take its folder"
        time.sleep(0.02)
    launcher.send_signal(signal.SIGINT)
    result = helpers.finish(launcher, timeout=120)
    assert result.returncode == 130, describe(result)
    lines = result.stderr.splitlines()
    assert lines[-1] == "[launcher] interrupted: stopped the 2 processes", describe(result)
    for index in (0, 1):
        said = [line for line in lines if line.startswith(f"[{index}] mnist_siamese.py: ")]
        assert len(said) == 1 and "interrupted" in said[0], describe(result)
    assert "Traceback" not in result.stderr and "exited with code" not in result.stderr
    assert list(tmp_path.iterdir()) == [], describe(result)


def test_a_ctrl_c_while_the_lock_is_taken_leaves_no_folder(tmp_path, monkeypatch, ctrl_c_raises):
    # The Ctrl-C lands after the lock file is made and before the lock is held, as it once
    # did in the test above on a loaded machine (the folders stayed, the lock file inside):
    # it waits until the lock is held, and the folders the run made go with it.
    acquire = filelock.FileLock.acquire

    def acquire_then_interrupt(self, *args, **kwargs):
        held = acquire(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # an undeferred handler would have run by now
        return held

    monkeypatch.setattr(filelock.FileLock, "acquire", acquire_then_interrupt)
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with run_folder.exclusive_use(tmp_path / "new" / "run"):
            reached.append("the run")
    assert reached == [] and list(tmp_path.iterdir()) == []
