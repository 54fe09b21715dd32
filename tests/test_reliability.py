"""Both scripts as real runs meet real trouble: a second run, a full disk, SIGTERM, odd data.

Every case runs a script as a user or a scheduler would, and checks the exit code, the
one-line message, that no traceback shows, and what the output folder holds afterwards.
What meets the trouble runs in a subprocess: the run that holds a folder, gets a signal,
fails a write, or says its one line as the user sees it. The runs that only go on from
there (a resume, a second run refused) or read odd data run `main()` in the test process
(`helpers.run_main`), which spares each the subprocess's imports.
"""

import contextlib
import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import textwrap
import time

import helpers
import numpy as np
import pytest
from helpers import FIXTURE, MNIST, TRIPLET, describe

import mnist_siamese
import triplet_totally_looks_like
from siamese_support import command_line, run_folder, synthetic

# A small MNIST run: 1,000 training and 1,000 test images of the fixture, no plots.
MNIST_RUN = ["--data", FIXTURE, "--limit", "1000", "--no-plots", "--output-dir", "run"]
# A small triplet run on generated pairs (written by the `pairs` fixture).
TRIPLET_RUN = ["--weights", "none", "--image-size", "32", "--batch-size", "4", "--no-plots"]
TRIPLET_RUN += ["--output-dir", "run"]


def wait_for(path, process, seconds=240):
    """Wait until `path` exists while `process` runs; fail if it ends or time runs out."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, describe(helpers.finish(process))
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def run_in_process(script, args, cwd, capsys):
    """The script's `main(ARGS)` in the test process (`helpers.run_main`).

    An MNIST run keeps TensorFlow's own thread count (`helpers.same_threads`): left to
    choose, main() would set one thread per operation for the whole test process.
    """
    if script == MNIST:
        return helpers.run_main(mnist_siamese, [*args, *helpers.same_threads()], cwd, capsys)
    return helpers.run_main(triplet_totally_looks_like, args, cwd, capsys)


def epochs_logged(output_dir):
    with open(output_dir / "history.csv", newline="") as stream:
        return [row["epoch"] for row in csv.DictReader(stream)]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A folder of 24 generated image pairs in the Totally Looks Like layout."""
    folder = tmp_path_factory.mktemp("pairs")
    synthetic.make_synthetic_dataset(folder, pairs=24, image_size=32, seed=3)
    return folder


# ---------------------------------------------------------------------------
# One run per folder
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_mnist_run_on_a_busy_folder_exits_at_once(tmp_path, capsys):
    # Batches of 8: two epochs of seconds still to go when the first is backed up, so that
    # the SIGSTOP below finds the run alive even on a loaded machine.
    args = [*MNIST_RUN, "--epochs", "3", "--batch-size", "8"]
    first = helpers.start(MNIST, args, tmp_path)
    wait_for(tmp_path / "run" / "backup" / "training_metadata.json", first)
    # Stopped (SIGSTOP) after its first epoch, the first run is alive and holds the folder
    # for as long as the second takes, however short its own training.
    first.send_signal(signal.SIGSTOP)
    try:
        # The same command again, as a requeued job would start it, while the first still
        # runs (the refusal as a user sees it, in its own process: the locked-folder test).
        second = helpers.run_main(mnist_siamese, [*args, "--resume"], tmp_path, capsys)
        assert first.poll() is None, "the first run ended before the second started"
    finally:
        first.send_signal(signal.SIGCONT)
    helpers.assert_one_line_error(
        second, MNIST.name, "is in use by another run", f"process {first.pid}"
    )
    assert "training pairs" not in second.stdout  # refused before loading the data
    # The first run is unharmed and finishes; it leaves no lock file behind.
    finished = helpers.finish(first)
    assert finished.returncode == 0, describe(finished)
    assert epochs_logged(tmp_path / "run") == ["0", "1", "2"]
    assert not (tmp_path / "run" / ".lock").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", [MNIST, TRIPLET], ids=["mnist", "triplet"])
def test_a_locked_folder_is_refused_and_left_as_it_was(tmp_path, script, pairs):
    folder = tmp_path / "run"
    with run_folder.exclusive_use(folder):
        before = sorted(path.name for path in folder.iterdir())
        args = MNIST_RUN if script == MNIST else ["--data-dir", pairs, *TRIPLET_RUN]
        result = helpers.run(script, [*args, "--epochs", "1"], tmp_path)
        assert sorted(path.name for path in folder.iterdir()) == before
    hint = f"--output-dir run is in use by another run (process {os.getpid()})"
    helpers.assert_one_line_error(result, script.name, hint)
    # Released by the holder, the folder is free again, and a folder the holder created
    # for nothing is gone.
    assert not folder.exists()


# ---------------------------------------------------------------------------
# Full disks and other write failures
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def small_file_system(path, megabytes):
    """A tmpfs of `megabytes` mounted at `path`; skips the test where mounting is refused."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here ({mounted.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder, leave_bytes):
    """Write a filler file that leaves about `leave_bytes` free on `folder`'s file system."""
    free = shutil.disk_usage(folder).free
    filler = folder / "filler"
    with open(filler, "wb") as stream:
        stream.write(b"\0" * max(free - leave_bytes, 0))
    return filler


@pytest.mark.slow
def test_mnist_on_a_full_disk_stops_in_one_line_and_resumes(tmp_path, capsys):
    disk = small_file_system(tmp_path / "disk", 16)
    with disk as mount_point:
        # Room for the first epoch's backup (about 1.1 MB) but not for the second's, which
        # keeps a copy of the first while it is written.
        filler = fill(mount_point, 1_800_000)
        args = [*MNIST_RUN[:-1], mount_point / "run", "--epochs", "3"]
        result = helpers.run(MNIST, args, tmp_path)
        helpers.assert_one_line_error(result, MNIST.name, "space", "--resume")
        output_dir = mount_point / "run"
        assert not (output_dir / "metrics.json").exists()
        assert (output_dir / "backup" / "training_metadata.json").exists()
        assert not list(output_dir.glob(".tmp-*")), list(output_dir.iterdir())

        # Space freed, the same command with --resume goes on from the last finished epoch.
        filler.unlink()
        resumed = run_in_process(MNIST, [*args, "--resume"], tmp_path, capsys)
        assert resumed.returncode == 0, describe(resumed)
        assert "Epoch 1/3" not in resumed.stdout
        assert epochs_logged(output_dir) == ["0", "1", "2"]
        assert not (output_dir / "backup").exists()


# Runs a script with one function replaced by one that fails as a full disk does.
FAILING_WRITE = textwrap.dedent(
    """
    import errno, pathlib, sys
    script, what = pathlib.Path(sys.argv[1]), sys.argv[2]
    module = __import__(script.stem)  # first: it starts TensorFlow quietly
    from siamese_support import run_folder

    def failing(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]))

    setattr(run_folder, what, failing)
    sys.exit(module.main(sys.argv[3:]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("script", [MNIST, TRIPLET], ids=["mnist", "triplet"])
def test_a_failed_save_keeps_the_trained_run_resumable(tmp_path, script, pairs, capsys):
    base = MNIST_RUN if script == MNIST else ["--data-dir", pairs, *TRIPLET_RUN]
    args = [*base, "--epochs", "2"]
    failed = helpers.run(script, ["save_model", *args], tmp_path, python_code=FAILING_WRITE)
    helpers.assert_one_line_error(failed, script.name, "No space left on device", "--resume")
    output_dir = tmp_path / "run"
    assert not (output_dir / "metrics.json").exists()
    # The finished training is kept until every output is written.
    assert (output_dir / "backup" / "training_metadata.json").exists()

    resumed = run_in_process(script, [*args, "--resume"], tmp_path, capsys)
    assert resumed.returncode == 0, describe(resumed)
    assert "Epoch 1/2" not in resumed.stdout and "Epoch 2/2" not in resumed.stdout
    assert epochs_logged(output_dir) == ["0", "1"]
    assert json.loads((output_dir / "metrics.json").read_text())["epochs"] == 2
    assert not (output_dir / "backup").exists()


@pytest.mark.slow
def test_a_read_only_output_folder_is_one_line(tmp_path):
    if os.geteuid() == 0:
        disk = small_file_system(tmp_path / "disk", 1)
        with disk as mount_point:
            subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
            result = helpers.run(MNIST, [*MNIST_RUN[:-1], mount_point / "run"], tmp_path)
    else:
        folder = tmp_path / "locked"
        folder.mkdir(mode=0o500)
        result = helpers.run(MNIST, [*MNIST_RUN[:-1], folder / "run"], tmp_path)
    helpers.assert_one_line_error(result, MNIST.name, "cannot be written")


# ---------------------------------------------------------------------------
# SIGTERM, as schedulers stop jobs
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("script", [MNIST, TRIPLET], ids=["mnist", "triplet"])
def test_sigterm_is_handled_like_ctrl_c(tmp_path, script, pairs, capsys):
    # MNIST in batches of 8 (215 steps, seconds an epoch): in batches of 128 its epochs of
    # 0.3 s once all ended before the signal came, on a loaded machine.
    base = [*MNIST_RUN, "--batch-size", "8"] if script == MNIST else ["--data-dir", pairs]
    base += [] if script == MNIST else TRIPLET_RUN
    # Stopped after its first epoch's backup, with two epochs still to go.
    args = [*base, "--epochs", "3"]
    process = helpers.start(script, args, tmp_path)
    wait_for(tmp_path / "run" / "backup" / "training_metadata.json", process)
    process.send_signal(signal.SIGTERM)
    stopped = helpers.finish(process)
    helpers.assert_one_line_error(stopped, script.name, "terminated", "--resume", code=143)
    assert not (tmp_path / "run" / "metrics.json").exists()

    resumed = run_in_process(script, [*args, "--resume"], tmp_path, capsys)
    assert resumed.returncode == 0, describe(resumed)
    assert "Epoch 1/3" not in resumed.stdout
    assert epochs_logged(tmp_path / "run") == ["0", "1", "2"]


def test_sigterm_during_a_backup_is_delivered_after_it():
    reached = []
    with pytest.raises(command_line.Terminated):
        with run_folder.ctrl_c_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # an undeferred handler would have run by now
            reached.append("end of block")
    assert reached == ["end of block"]


# ---------------------------------------------------------------------------
# Data as people have it
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_mnist_as_fractions_trains_as_the_uint8_file_does(tmp_path, capsys):
    with np.load(FIXTURE) as archive:
        arrays = {name: archive[name] for name in archive.files}
    for name in ("x_train", "x_test"):
        arrays[name] = arrays[name] / 255.0
    np.savez(tmp_path / "fractions.npz", **arrays)
    small = ["--limit", "600", "--epochs", "1", "--no-plots"]
    # Both through main(): the seeds it sets make the two runs alike in one process too.
    uint8_args = ["--data", FIXTURE, *small, "--output-dir", "a"]
    uint8_run = run_in_process(MNIST, uint8_args, tmp_path, capsys)
    fraction_args = ["--data", tmp_path / "fractions.npz", *small, "--output-dir", "b"]
    fraction_run = run_in_process(MNIST, fraction_args, tmp_path, capsys)
    assert uint8_run.returncode == 0 and fraction_run.returncode == 0, describe(fraction_run)
    assert "float64 values in [0, 1]; read as pixel values 0-255" in fraction_run.stdout
    metrics = [json.loads((tmp_path / side / "metrics.json").read_text()) for side in "ab"]
    assert metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"]


@pytest.mark.slow
def test_mnist_with_a_nan_exits_2_naming_the_array(tmp_path):
    with np.load(FIXTURE) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["x_test"] = arrays["x_test"] / 255.0
    arrays["x_train"] = arrays["x_train"] / 255.0
    arrays["x_train"][10, 5, 5] = np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    result = helpers.run(MNIST, ["--data", tmp_path / "nan.npz", "--output-dir", "run"], tmp_path)
    helpers.assert_one_line_error(result, MNIST.name, "x_train holds NaN or infinite values")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_folders_as_people_have_them(tmp_path, pairs, capsys):
    data = tmp_path / "data"
    shutil.copytree(pairs, data)
    (data / "right" / "Thumbs.db").write_bytes(b"\0" * 100)
    (data / "left" / "desktop.ini").write_text("[.ShellClassInfo]\n")
    (data / "left" / ".DS_Store").write_bytes(b"\0" * 10)
    (data / "right" / "notes.txt").write_text("where these came from\n")
    (data / "left" / "originals").mkdir()
    (data / "left" / "originals" / "00001.jpg").write_bytes(
        (data / "left" / "00001.jpg").read_bytes()
    )
    (data / "left" / "00003.jpg").write_bytes(b"")  # an empty file: an unreadable image
    args = ["--data-dir", data, *TRIPLET_RUN, "--epochs", "1"]
    result = run_in_process(TRIPLET, args, tmp_path, capsys)
    assert result.returncode == 0, describe(result)
    assert "Traceback" not in result.stderr
    assert "Ignored 5 entries that are not images" in result.stdout, result.stdout
    assert "00003.jpg is not a readable image" in result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_pairs"] == ["00003.jpg"]
    assert metrics["training_pairs"] + metrics["validation_pairs"] == 23


def test_a_write_error_says_what_to_do(tmp_path):
    # The one line names the file, the cause and the way on; --resume only once an epoch is
    # backed up (checked on a bare error: the wording does not depend on the system's).
    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "history.csv"))
    line = run_folder.explain_write_error(error, tmp_path)
    assert "history.csv" in line and "free some space" in line and "run the command again" in line
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "training_metadata.json").write_text("{}")
    line = run_folder.explain_write_error(error, tmp_path)
    assert "--resume" in line, line
    read_only = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "metrics.json"))
    assert "make " in run_folder.explain_write_error(read_only, tmp_path)


def test_an_error_raised_while_handling_ctrl_c_counts_as_ctrl_c(tmp_path, capsys):
    # Ctrl-C can land inside a library's own `with` block (TensorFlow's device scopes), whose
    # clean-up then fails with an error of its own; the user asked to stop, and is told so.
    with command_line.one_line_errors("prog") as status:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("Exiting device scope without proper scope nesting") from None
    assert status.code == 130
    assert capsys.readouterr().err == "prog: interrupted\n"

    output_dir = tmp_path / "run"
    with (
        command_line.one_line_errors("prog") as status,
        run_folder.exclusive_use(output_dir),
    ):
        (output_dir / "backup").mkdir()
        (output_dir / "backup" / "training_metadata.json").write_text("{}")
        try:
            raise command_line.Terminated
        except KeyboardInterrupt:
            raise RuntimeError("Exiting device scope without proper scope nesting") from None
    assert status.code == 143
    said = capsys.readouterr().err
    assert said.startswith("prog: terminated: finished epochs are backed up") and "--resume" in said

    # Any other error is not swallowed.
    with pytest.raises(RuntimeError), command_line.one_line_errors("prog"):
        raise RuntimeError("a bug")


def test_sigterm_while_a_lost_process_is_reported_keeps_that_report(capsys):
    # The launcher stops the other processes with SIGTERM as soon as one dies; a process that
    # found the loss itself may get the signal while its report leaves the run folder.
    lost = "stopped: another process of this run stopped (UNKNOWN: Gloo); start every process"
    with command_line.one_line_errors("prog") as status:
        try:
            raise command_line.ProcessLost(lost + " again with --resume to continue")
        finally:
            raise command_line.Terminated  # no message: raised outside the run folder
    assert status.code == 1
    assert capsys.readouterr().err == f"prog: {lost} again with --resume to continue\n"
    # A signal whose message says where the run stands keeps its own report.
    with command_line.one_line_errors("prog") as status:
        try:
            raise command_line.ProcessLost(lost)
        finally:
            raise command_line.Terminated("terminated: finished epochs are backed up")
    assert status.code == 143
    assert capsys.readouterr().err == "prog: terminated: finished epochs are backed up\n"


def test_a_signal_while_an_error_is_reported_does_not_cut_the_report(monkeypatch, capsys):
    # Process 0 of a run whose other process died reports the loss; the launcher's SIGTERM
    # to it can land in the middle of that report (seen under load).
    original = command_line.interrupt_behind

    def signalled_while_reporting(error):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # a handler runs between two bytecodes of the main thread
        return original(error)

    monkeypatch.setattr(command_line, "interrupt_behind", signalled_while_reporting)
    lost = "stopped: another process of this run stopped; start every process again"
    # Python's own handlers, whatever this test process was started with.
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with command_line.one_line_errors("prog") as status:
            raise command_line.ProcessLost(lost)
        # Outside a report, the handlers are those from before.
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    except KeyboardInterrupt as interrupt:  # not to pytest, which would stop the session
        pytest.fail(f"the report was cut short by {type(interrupt).__name__}")
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert status.code == 1
    assert capsys.readouterr().err == f"prog: {lost}\n"
