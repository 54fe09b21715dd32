"""The run's output folder: atomic writes, the per-epoch backup, resuming, the epoch log.

A tutorial trains once and prints; a run that people rely on must not lose a finished model
or an hour of training to a crash, a Ctrl-C or a second run in the same folder. None of
that is about Siamese networks, and both scripts need the same, so it lives here.
"""

import contextlib
import csv
import json
import os
import pathlib
import shutil
import signal
import tempfile
import threading
import time

import keras


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; move it into place if the block succeeds.

    A crash or Ctrl-C midway leaves the previous file (if any) untouched.
    """
    path = pathlib.Path(path)
    handle, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".tmp-{path.stem}-", suffix=path.suffix
    )
    os.close(handle)
    # mkstemp creates the file readable by its owner only; give it the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(data, path):
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        pathlib.Path(temporary).write_text(json.dumps(data, indent=2) + "\n")


def write_csv(rows, path, fieldnames=None):
    """Write dictionaries as CSV rows (columns: `fieldnames` or the first row's), atomically."""
    with atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=fieldnames or list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def save_model(model, path):
    """Save a Keras model as a `.keras` file, atomically."""
    with atomic_path(path) as temporary:
        model.save(temporary)


def prepare_output_dir(output_dir, resume=False, overwrite=False, dry_run=False, outputs=()):
    """Create the output folder and decide whether a run may start in it.

    A folder that holds a finished run (its `metrics.json`) is kept unless `overwrite`
    (a dry run may replace an earlier dry run's output). A folder with an interrupted
    run's backup continues it with `resume`, starts over with `overwrite`, and is
    refused otherwise. `overwrite` removes `metrics.json`, the backup and the files named
    in `outputs`, nothing else. Returns the folder as a `pathlib.Path`.
    """
    output_dir = pathlib.Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file, not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise ValueError(
            f"--output-dir {output_dir} cannot be written ({error.strerror or error})"
        ) from None
    metrics_path = output_dir / "metrics.json"
    backup_dir = output_dir / "backup"
    if metrics_path.exists() and not overwrite:
        if not (dry_run and written_by_dry_run(metrics_path)):
            raise ValueError(
                f"--output-dir {output_dir} already holds a finished run; pass "
                "--overwrite to replace it or choose another --output-dir"
            )
        overwrite = True
    if backup_dir.exists() and not (resume or overwrite):
        raise ValueError(
            f"--output-dir {output_dir} holds an interrupted run; pass --resume to "
            "continue it or --overwrite to start over"
        )
    if overwrite:
        # The finished-run marker goes first, so a crash from here on does not leave
        # the folder looking finished.
        for name in ("metrics.json", *outputs):
            (output_dir / name).unlink(missing_ok=True)
        shutil.rmtree(backup_dir, ignore_errors=True)
    # Rows logged by a run that left no backup belong to no run that can be resumed.
    if not backup_dir.exists():
        (output_dir / "history-progress.csv").unlink(missing_ok=True)
    # Caches of a run that was killed before it could remove them; no run uses them now.
    for stale_cache in output_dir.glob(".cache-*"):
        shutil.rmtree(stale_cache, ignore_errors=True)
    return output_dir


def written_by_dry_run(metrics_path):
    """Whether a `metrics.json` was written by a dry run."""
    try:
        return bool(json.loads(pathlib.Path(metrics_path).read_text()).get("dry_run"))
    except (OSError, ValueError, AttributeError):
        return False


def check_same_as_interrupted_run(output_dir, name, record, describe_difference):
    """Refuse to resume when `record` differs from the interrupted run's file `name`.

    The interrupted run wrote `record` as the JSON file `name` in `output_dir`; with no
    backup (nothing to resume) or no such file, there is nothing to compare.
    `describe_difference(earlier)` returns the sentence that names what changed.
    Afterwards `record` is written as `name`, for a later resume.
    """
    output_dir = pathlib.Path(output_dir)
    path = output_dir / name
    earlier = None
    if (output_dir / "backup").exists() and path.exists():
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = None
    if earlier is not None and earlier != record:
        raise ValueError(
            f"{describe_difference(earlier)}; rerun its exact command with --resume, or pass "
            "--overwrite to start over"
        )
    write_json(record, path)


def check_same_settings(output_dir, settings):
    """Refuse to resume with settings other than the interrupted run's `settings.json`.

    `settings` maps option names (`image_size` for `--image-size`) to values; the message
    names each changed option with its earlier and its new value.
    """

    def changed(earlier):
        changes = [
            f"--{key.replace('_', '-')} {earlier.get(key)} -> {value}"
            for key, value in settings.items()
            if earlier.get(key) != value
        ]
        return f"the interrupted run in {output_dir} used other settings ({', '.join(changes)})"

    check_same_as_interrupted_run(output_dir, "settings.json", settings, changed)


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch (training and validation) run in this process."""

    def on_train_begin(self, logs=None):
        self.durations = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.durations.append(time.perf_counter() - self._start)

    def mean(self):
        """Mean seconds per epoch run in this process, or None if none ran."""
        return sum(self.durations) / len(self.durations) if self.durations else None


@contextlib.contextmanager
def ctrl_c_deferred():
    """Hold back Ctrl-C (SIGINT) until the block is done, then raise KeyboardInterrupt.

    Only the main thread can handle signals; elsewhere the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(
            signal.SIGINT, previous if previous is not None else signal.default_int_handler
        )
    if received:
        raise KeyboardInterrupt


class InterruptSafeBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` whose end-of-epoch save is not cut short by Ctrl-C.

    A Ctrl-C during the save would leave a half-written backup, which the resumed run
    could not read; it is delivered once the save is complete instead.
    """

    def on_epoch_end(self, epoch, logs=None):
        with ctrl_c_deferred():
            super().on_epoch_end(epoch, logs)


def training_callbacks(output_dir):
    """Log the epoch's row, then back up the training state, every epoch; time the epochs.

    Returns `[logger, backup, timer]`. The row comes first: if a run dies between the two,
    the resumed run repeats that epoch and logs it again, and `final_history` keeps the
    later row (the other order would lose the row of an epoch the backup already counts as
    done). The backup is kept when training ends and removed by `finish_run` once every
    output is written, so a crash while saving resumes at the last epoch.
    """
    output_dir = pathlib.Path(output_dir)
    return [
        keras.callbacks.CSVLogger(str(output_dir / "history-progress.csv"), append=True),
        InterruptSafeBackupAndRestore(
            backup_dir=str(output_dir / "backup"),
            double_checkpoint=True,
            delete_checkpoint=False,
        ),
        EpochTimer(),
    ]


def interrupted_message(output_dir):
    """What Ctrl-C during training leaves, and how to go on: the message to print."""
    backup = pathlib.Path(output_dir) / "backup"
    if (backup / "training_metadata.json").exists():
        return (
            f"interrupted: finished epochs are backed up in {backup}; run the same "
            "command with --resume to continue"
        )
    return "interrupted before the first epoch finished; nothing to resume"


@contextlib.contextmanager
def resume_hint_on_interrupt(output_dir):
    """Turn Ctrl-C inside the block into a `KeyboardInterrupt` that says how to resume."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_message(output_dir)) from None


def final_history(output_dir):
    """The per-epoch rows logged across interruptions: the last row of each epoch, in order."""
    path = pathlib.Path(output_dir) / "history-progress.csv"
    if not path.exists():
        return []
    with open(path, newline="") as stream:
        rows = {int(row["epoch"]): row for row in csv.DictReader(stream)}
    return [rows[epoch] for epoch in sorted(rows)]


def finish_run(output_dir, metrics):
    """Write `metrics.json`, which marks the run as finished, then drop the backup.

    Called after every other output is written: until then, a crash leaves a run that
    resumes at its last finished epoch.
    """
    output_dir = pathlib.Path(output_dir)
    write_json(metrics, output_dir / "metrics.json")
    shutil.rmtree(output_dir / "backup", ignore_errors=True)
    (output_dir / "history-progress.csv").unlink(missing_ok=True)
