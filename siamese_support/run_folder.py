"""The run's output folder: atomic writes, the per-epoch backup, resuming, the epoch log.

A tutorial trains once and prints; a run that people rely on must not lose a finished model
or an hour of training to a crash, a Ctrl-C or a second run in the same folder. None of
that is about Siamese networks, and both scripts need the same, so it lives here.
"""

import contextlib
import csv
import errno
import json
import math
import os
import pathlib
import shutil
import signal
import tempfile
import threading
import time

import filelock
import keras
import numpy as np

from siamese_support import command_line, devices, resumed_draws


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; move it into place if the block succeeds.

    A crash or Ctrl-C midway leaves the previous file (if any) untouched.
    """
    path = pathlib.Path(path)
    try:
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".tmp-{path.stem}-", suffix=path.suffix
        )
    except OSError as error:  # its folder is missing or read-only: name the file, not the temporary
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None
    os.close(handle)
    # mkstemp creates the file readable by its owner only; give it the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        # Name the file the user knows, not the temporary one.
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def make_parent_folder(path, option):
    """Create the folder of the file `path` (given as `option`) and its parents, if needed."""
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or str(error)
        existing = next(folder for folder in path.parents if folder.exists())
        if not existing.is_dir():
            reason = f"{existing} is a file"
        raise ValueError(f"{option} {path}: its folder cannot be made ({reason})") from None
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name")


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
    refused otherwise. `overwrite` removes `metrics.json`, the backup, the TensorBoard logs
    (`remove_tensorboard_logs`, also done in a folder without a backup) and the files named
    in `outputs`, nothing else. Returns the folder as a `pathlib.Path`.
    """
    output_dir = pathlib.Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file, not a folder")
    check_kinds(output_dir, ("metrics.json", "history-progress.csv", *outputs))
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
    # Rows and TensorBoard points logged by a run that left no backup belong to no run that
    # can be resumed. A resumed run adds to them.
    if not backup_dir.exists():
        (output_dir / "history-progress.csv").unlink(missing_ok=True)
        remove_tensorboard_logs(output_dir)
    # Caches of a run that was killed before it could remove them; no run uses them now.
    for stale_cache in output_dir.glob(".cache-*"):
        shutil.rmtree(stale_cache, ignore_errors=True)
    return output_dir


def check_kinds(output_dir, files, folders=("backup", "logs")):
    """Refuse, before training, a folder where the run writes a file, or the other way round.

    TensorBoard's writer, for one, fails with a traceback at the first epoch on a file named
    `logs`, and `--overwrite` removes only what a run writes.
    """
    what = {"backup": "its per-epoch backup, a folder", "logs": "TensorBoard's logs, a folder"}
    wanted = {**dict.fromkeys(files, "a file"), **{name: what[name] for name in folders}}
    for name, kind in wanted.items():
        path = output_dir / name
        if path.is_symlink() or not path.exists() or path.is_dir() == kind.endswith("folder"):
            continue
        found = "a folder" if path.is_dir() else "a file"
        raise ValueError(
            f"--output-dir {output_dir} holds {found} named {name}, where the run writes "
            f"{kind}: move it away, or choose another --output-dir"
        )


def check_not_finished(output_dir, epochs):
    """With `--resume`, a finished run (`metrics.json`) ends the command before any work.

    The same command run again (a scheduler's retry, a pipeline run twice) then succeeds:
    `NothingToDo` (exit code 0) when the run trained at least `epochs` epochs. More epochs
    cannot be added: at the end a run drops its backup (the optimizer's state, the random
    streams) and keeps the model alone, so a longer run starts over, in another folder.
    """
    metrics_path = pathlib.Path(output_dir) / "metrics.json"
    try:
        finished = int(json.loads(metrics_path.read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # no finished run (or not one this can read): prepare_output_dir decides
    trained = f"{finished} epoch" + ("" if finished == 1 else "s")
    if epochs is None or epochs <= finished:
        raise command_line.NothingToDo(
            f"nothing to resume: the run in {output_dir} finished, after {trained}"
        )
    raise ValueError(
        f"--resume: the run in {output_dir} finished after {trained} and keeps no "
        f"training state to go on from, so it cannot be taken to --epochs {epochs}; start "
        "a new run (another --output-dir, or --overwrite to replace this one)"
    )


# The files of TensorBoard's projector that a triplet run writes into `logs/validation/`.
PROJECTOR_FILES = ("projector_config.pbtxt", "embeddings.tsv", "metadata.tsv", "sprite.png")


def remove_tensorboard_logs(output_dir):
    """Remove the TensorBoard logs of `output_dir` (`logs/`): its event files, nothing else.

    The event files of `logs/`, `logs/train/` and `logs/validation/` go, and the projector's
    files in `logs/validation/`, then those folders if nothing else is left in them.
    """
    logs = pathlib.Path(output_dir) / "logs"
    for name in PROJECTOR_FILES:  # the triplet run's embeddings for the projector
        (logs / "validation" / name).unlink(missing_ok=True)
    for folder in (logs / "train", logs / "validation", logs):
        for events in folder.glob("events.out.tfevents.*"):
            events.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not there, or holds something else
            folder.rmdir()


def written_by_dry_run(metrics_path):
    """Whether a `metrics.json` was written by a dry run."""
    try:
        return bool(json.loads(pathlib.Path(metrics_path).read_text()).get("dry_run"))
    except (OSError, ValueError, AttributeError):
        return False


def check_same_as_interrupted_run(output_dir, name, record, describe_difference, recorded=None):
    """Refuse to resume when `record` differs from the interrupted run's file `name`.

    The interrupted run wrote `record` as the JSON file `name` in `output_dir`; with no
    backup (nothing to resume) or no such file, there is nothing to compare.
    `describe_difference(earlier)` returns the sentence that names what changed.
    Afterwards `record` is written as `name`, for a later resume, with `recorded` (a dict
    of what made the run, `PROVENANCE_KEYS`), which is kept but never compared: a run may
    be resumed under another backend or version.
    """
    output_dir = pathlib.Path(output_dir)
    path = output_dir / name
    earlier = read_interrupted_record(output_dir, name)
    if earlier is not None:
        earlier = {key: value for key, value in earlier.items() if key not in PROVENANCE_KEYS}
    if earlier is not None and earlier != record:
        raise ValueError(
            f"{describe_difference(earlier)}; rerun its exact command with --resume, or pass "
            "--overwrite to start over"
        )
    write_json({**record, **(recorded or {})}, path)


# What `devices.provenance` records in settings.json, and `Run.start` adds when a resume
# changes the backend: recorded, never checked.
PROVENANCE_KEYS = ("backend", "versions", "device", "device_count", "earlier_backends")


def read_interrupted_record(output_dir, name):
    """The JSON object the interrupted run in `output_dir` wrote as `name`, or None.

    None where there is no backup (nothing to resume), no such file, or not a JSON object.
    """
    output_dir = pathlib.Path(output_dir)
    if not (output_dir / "backup").exists():
        return None
    try:
        earlier = json.loads((output_dir / name).read_text())
    except (OSError, ValueError):
        return None
    return earlier if isinstance(earlier, dict) else None


def check_same_split(output_dir, train_files, validation_files):
    """Refuse to resume on other pairs or another split than the interrupted run's.

    The split is recorded by file name in `split.json` (`train` and `validation`).
    """
    split = {"train": train_files, "validation": validation_files}
    split = {side: [os.path.basename(name) for name in names] for side, names in split.items()}
    changed = "the pairs or their split differ from those of the interrupted run in "
    changed += f"{output_dir} (data, --limit, --validation-split or --seed changed)"
    check_same_as_interrupted_run(output_dir, "split.json", split, lambda _: changed)


def check_same_settings(output_dir, settings, recorded=None):
    """Refuse to resume with settings other than the interrupted run's `settings.json`.

    `settings` maps option names (`image_size` for `--image-size`) to values; the message
    names each changed option with its earlier and its new value. `recorded` (what made
    the run, `devices.provenance`) is written too, and not compared.
    """

    def changed(earlier):
        changes = [
            f"--{key.replace('_', '-')} {earlier.get(key)} -> {value}"
            for key, value in settings.items()
            if earlier.get(key) != value
        ]
        return f"the interrupted run in {output_dir} used other settings ({', '.join(changes)})"

    check_same_as_interrupted_run(output_dir, "settings.json", settings, changed, recorded)


def resumed_provenance(output_dir, made_with):
    """What made a run, `made_with` (`devices.provenance()`), with what made its earlier epochs.

    Returns `(provenance, notice)`. When `output_dir` holds an interrupted run to resume
    whose `settings.json` names another backend, `provenance` adds `earlier_backends`, the
    backends that trained the earlier epochs, in order (kept across later resumes), and
    `notice` is the line that says so: a run resumed across backends works, but its figures
    need not match an uninterrupted run's. Otherwise `notice` is None. Versions and devices
    may change unremarked.
    """
    earlier = (
        read_interrupted_record(output_dir, "settings.json") if resumable(output_dir) else None
    )
    if not earlier or not isinstance(earlier.get("backend"), str):
        return made_with, None
    backends = earlier.get("earlier_backends")
    backends = [*(backends if isinstance(backends, list) else []), earlier["backend"]]
    # One name per stretch of epochs: jax, jax (resumed twice) is one jax.
    backends = [name for i, name in enumerate(backends) if i == 0 or name != backends[i - 1]]
    if backends == [made_with["backend"]]:
        return made_with, None
    notice = (
        f"Resuming a run made with {' and '.join(dict.fromkeys(backends))} under "
        f"{made_with['backend']}: its figures may differ from an uninterrupted run's"
    )
    return {**made_with, "earlier_backends": backends}, notice


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch (training and validation) run in this process."""

    durations = ()  # until training begins

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
    """Hold back Ctrl-C (SIGINT) and SIGTERM until the block is done, then deliver them.

    After the block, a held-back SIGTERM raises `command_line.Terminated` and a Ctrl-C
    `KeyboardInterrupt`. A signal set to be ignored stays ignored. Only the main thread can
    handle signals; elsewhere the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    if signal.SIGTERM in received:
        raise command_line.Terminated
    if received:
        raise KeyboardInterrupt


class InterruptSafeBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` whose end-of-epoch save is neither cut short nor left half-written.

    A Ctrl-C or SIGTERM during the save would leave a backup the resumed run could not
    read; it is delivered once the save is complete instead. A disk too full for the save
    is found before it starts: the HDF5 library, out of space midway, prints pages of
    errors and can crash the process, and the previous epoch's backup must stay intact.
    """

    # Saves only at an epoch's end: its batch hook (Keras's, a counter) may run on Keras's
    # thread for callbacks, so that under JAX the training loop does not wait for each call.
    async_safe = True

    def on_epoch_end(self, epoch, logs=None):
        self._check_free_space()
        with ctrl_c_deferred():
            # The layers' random state, which the weights leave out (`resumed_draws`).
            resumed_draws.save_seed_states(self.model, self.backup_dir, epoch)
            super().on_epoch_end(epoch, logs)

    def _check_free_space(self):
        backup_dir = pathlib.Path(self.backup_dir)
        weights = backup_dir / "latest.weights.h5"
        if weights.exists():
            # The save first copies the last backup aside, then writes the new one.
            needed = 2 * weights.stat().st_size
        else:
            variables = [*self.model.weights, *self.model.optimizer.variables]
            needed = sum(
                math.prod(variable.shape) * np.dtype(variable.dtype).itemsize
                for variable in variables
            )
        needed += 1 << 18  # HDF5's own structures, the metadata file
        folder = backup_dir if backup_dir.exists() else backup_dir.parent
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise OSError(
                errno.ENOSPC,
                f"No space left on device for the epoch's backup: it needs about "
                f"{needed / 1e6:.1f} MB, {free / 1e6:.1f} MB are free",
                str(weights),
            )


class TensorBoardLogs(keras.callbacks.TensorBoard):
    """Keras's `TensorBoard` callback, one point per epoch, on disk when the epoch ends.

    TensorFlow's summary writers flush every two minutes: a run killed in between would
    lose the points of epochs that its backup holds, and the resumed run would leave a gap.
    The model graph is not written: Keras 3 writes no graph of the training step, only the
    configuration of a functional model.
    """

    def __init__(self, log_dir):
        super().__init__(log_dir=log_dir, write_graph=False)
        # `tf.summary` loads TensorBoard's summary code at its first call: 0.08-0.35 s,
        # measured, which would fall inside the first epoch.
        import tensorboard.summary.v2  # noqa: F401

    # Its batch hook does nothing (below): Keras may call it on its thread for callbacks.
    async_safe = True

    def on_train_batch_end(self, batch, logs=None):
        # Keras calls `tf.summary.scalar` for every batch even when it logs per epoch, with
        # no writer to write to: 0.5 ms a batch, measured, for nothing.
        pass

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        for writer in getattr(self, "_writers", {}).values():
            writer.flush()


def tensorboard_available():
    """Whether TensorBoard logs can be written, saying once when only TensorBoard is missing.

    Keras writes them with `tensorflow.summary`, which needs the `tensorboard` package. The
    MNIST script under JAX or PyTorch runs without TensorFlow on purpose, and then writes no
    logs, silently; with TensorFlow but without `tensorboard` (requirements.txt has it), it
    says how to get them.
    """
    try:
        with devices.quiet_tensorflow_start():  # already imported, or its notices silenced
            import tensorflow  # noqa: F401
    except ImportError:
        return False
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        if not _said_tensorboard_missing:
            print("No TensorBoard logs: `pip install tensorboard` to get them", flush=True)
            _said_tensorboard_missing.append(True)
        return False
    return True


_said_tensorboard_missing = []


def training_callbacks(output_dir, logs=True):
    """Log the epoch's row and TensorBoard points, then back up the training state; time epochs.

    Returns `[logger, tensorboard, backup, draws, timer]`. The row and the points come first:
    if a run dies before the backup, the resumed run repeats that epoch and logs it again, and
    `final_history` keeps the later row (the other order would lose the row of an epoch the
    backup already counts as done). The backup is kept when training ends and removed by
    `finish_run` once every output is written, so a crash while saving resumes at the last
    epoch. The TensorBoard logs go to `logs/` (`train/` and `validation/`; a resumed run adds
    to them), unless `logs` is false (a multi-process run's other processes) or TensorFlow
    and TensorBoard, which write them, are not both installed (`tensorboard_available`):
    then there is no `tensorboard`. `draws` gives each epoch, resumed or not, the random draws
    of an uninterrupted run (`resumed_draws.ResumedDraws`).
    """
    output_dir = pathlib.Path(output_dir)
    callbacks = [
        keras.callbacks.CSVLogger(str(output_dir / "history-progress.csv"), append=True),
    ]
    if logs and tensorboard_available():
        callbacks.append(TensorBoardLogs(str(output_dir / "logs")))
    return [
        *callbacks,
        InterruptSafeBackupAndRestore(
            backup_dir=str(output_dir / "backup"),
            double_checkpoint=True,
            delete_checkpoint=False,
        ),
        resumed_draws.ResumedDraws(output_dir / "backup"),
        EpochTimer(),
    ]


def resumable(output_dir):
    """Whether `output_dir` holds the backup of at least one finished epoch."""
    return (pathlib.Path(output_dir) / "backup" / "training_metadata.json").exists()


def interrupted_message(output_dir, interrupt=None):
    """What Ctrl-C (or SIGTERM, `interrupt` being `Terminated`) leaves, and how to go on."""
    word = "terminated" if isinstance(interrupt, command_line.Terminated) else "interrupted"
    backup = pathlib.Path(output_dir) / "backup"
    if resumable(output_dir):
        return (
            f"{word}: finished epochs are backed up in {backup}; run the same "
            "command with --resume to continue"
        )
    return f"{word} before the first epoch finished; nothing to resume"


def lost_process_message(output_dir, error):
    """What a multi-process run says when another of its processes died, and how to go on."""
    said = f"stopped: another process of this run stopped ({command_line.one_line(error)})"
    if resumable(output_dir):
        return f"{said}; start every process again with --resume to continue"
    return f"{said} before the first epoch finished; nothing to resume"


@contextlib.contextmanager
def exclusive_use(output_dir, place=(0, 1)):
    """This run's hold on its output folder for the block: one run per folder, failures explained.

    The folder is created if needed and locked with an OS lock on its `.lock` file (`_lock`),
    which the OS releases when the process ends, however it ends: a killed run leaves no
    stale lock. A second run on a locked folder is refused at once, naming the process that
    holds it. Inside the block, Ctrl-C, SIGTERM and a failed write (full disk, read-only
    file system, lost permission) become one message that says what is kept and how to go
    on (`failures_explained`). A folder this creates stays only if the run wrote something
    into it.

    Yields the folder this process uses. `place` is the process's `(index, count)` in a
    multi-process run: process 0 uses `output_dir`, which holds the run's outputs; each
    other process `output_dir/process-<index>`, where it keeps only its resume state. Such a
    process takes its folder once process 0 holds `output_dir` (see `Run.start`), and then
    also removes the folders that process 0 created, if they are empty when it ends last.
    """
    shared_dir = pathlib.Path(output_dir)
    output_dir = process_folder(shared_dir, place)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file, not a folder")
    created = [folder for folder in (output_dir, *output_dir.parents) if not folder.exists()]
    if place[0] > 0 and output_dir.exists():
        created.insert(0, output_dir)  # a process's own folder goes once it holds nothing
    if place[0] > 0 and shared_dir.exists():
        # Whichever process of the run ends last finds the shared folder empty.
        created += _created_by_holder(shared_dir)
    lock = None
    try:
        # A Ctrl-C between the lock file's creation and the lock's return would leave the
        # folder behind, lock file and all: it is delivered once the lock is held, below.
        with ctrl_c_deferred():
            try:
                output_dir.mkdir(parents=True, exist_ok=True)
                lock = _lock(output_dir, created)
            except OSError as error:
                raise ValueError(
                    f"--output-dir {output_dir} cannot be written ({error.strerror or error})"
                ) from None
        with failures_explained(output_dir):
            yield output_dir
    finally:
        if lock is not None:
            # Removed while still held. A run that opened the file just before does not count
            # a lock on the removed file: filelock checks, once locked, that the file is still
            # linked.
            (output_dir / ".lock").unlink(missing_ok=True)
            lock.release()
        _remove_if_empty(created)


def process_folder(output_dir, place):
    """The folder a process of a run keeps its state in: `output_dir` for process 0 (and a
    run of one process), `output_dir/process-<index>` for the others (`exclusive_use`)."""
    output_dir = pathlib.Path(output_dir)
    return output_dir / f"process-{place[0]}" if place[0] > 0 else output_dir


@contextlib.contextmanager
def failures_explained(output_dir):
    """Inside the block, Ctrl-C, SIGTERM, the loss of another process of the run and a failed
    write in `output_dir` become one message that says what is kept and how to go on."""
    output_dir = pathlib.Path(output_dir)
    try:
        yield
    except Exception as error:
        # An error raised while a Ctrl-C or SIGTERM was being handled is that interrupt.
        interrupt = command_line.interrupt_behind(error) or error
        if isinstance(interrupt, KeyboardInterrupt):
            raise type(interrupt)(interrupted_message(output_dir, interrupt)) from None
        if devices.lost_process(error):
            raise command_line.ProcessLost(lost_process_message(output_dir, error)) from None
        if not isinstance(error, OSError) or not _inside(error.filename, output_dir):
            raise
        raise ValueError(explain_write_error(error, output_dir)) from None
    except KeyboardInterrupt as interrupt:
        raise type(interrupt)(interrupted_message(output_dir, interrupt)) from None


def _lock(output_dir, created=()):
    """Take the OS lock on `output_dir/.lock` (filelock: `flock`, or Windows' own); return it.

    The OS releases the lock when the process ends, however it ends. The holder writes its
    process id into the file, so that a refused run can name it, and on a second line how
    many of the folders `output_dir`, its parent, ... the run `created`, so that the other
    processes of a multi-process run know which they may remove (`_created_by_holder`).
    """
    path = output_dir / ".lock"
    lock = filelock.FileLock(path, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        try:
            holder = (path.read_text().split() or [""])[0]
        except OSError:  # Windows: the holder's lock covers the file
            holder = ""
        who = f" (process {holder})" if holder.isdigit() else ""
        raise ValueError(
            f"--output-dir {output_dir} is in use by another run{who}; wait for it to "
            "end, or choose another --output-dir"
        ) from None
    made = [pathlib.Path(output_dir), *pathlib.Path(output_dir).parents][: len(created)]
    made = len(created) if list(created) == made else 0  # counted from output_dir up
    with contextlib.suppress(OSError):  # Windows: the lock covers the file
        path.write_text(f"{os.getpid()}\n{made}\n")
    return lock


def _created_by_holder(output_dir):
    """The folders `output_dir`, its parent, ... that the run holding its lock created.

    Read from the holder's `.lock` (`_lock`); none where it cannot be read.
    """
    output_dir = pathlib.Path(output_dir)
    try:
        count = int((output_dir / ".lock").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return []
    return [output_dir, *output_dir.parents][: max(count, 0)]


def _remove_if_empty(created):
    """Remove the folders `exclusive_use` created, deepest first, where nothing was written."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


def _inside(filename, folder):
    """Whether the file an error names lies in `folder`."""
    if not filename:
        return False
    try:
        return pathlib.Path(filename).resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError, TypeError):
        return False


def explain_write_error(error, output_dir):
    """One line for a failed write in `output_dir`: what, why, and how to go on."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        remedy = "free some space (or choose another --output-dir)"
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        remedy = f"make {output_dir} writable (or choose another --output-dir)"
    else:
        remedy = "check the disk"
    if resumable(output_dir):
        then = "then run the same command with --resume to continue from the last finished epoch"
    else:
        then = "then run the command again"
    return f"could not write {error.filename} ({reason}); {remedy}, {then}"


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
    resumes at its last finished epoch. `metrics` None (another process of a multi-process
    run) drops the backup and the records a resume checks, writing nothing.
    """
    output_dir = pathlib.Path(output_dir)
    if metrics is not None:  # None: a process that only kept resume state here
        write_json(metrics, output_dir / "metrics.json")
    else:  # which includes the split and settings that a resume checks
        for name in ("split.json", "settings.json"):
            (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(output_dir / "backup", ignore_errors=True)
    (output_dir / "history-progress.csv").unlink(missing_ok=True)


class Run(contextlib.ExitStack):
    """A training run's hold on its output folder, and the folder's bookkeeping.

    What a tutorial does not have, behind one object::

        with run_folder.Run(output_dir, resume, overwrite, dry_run) as run:
            ...                       # load the data, make pairs, build the network
            run.start()               # the folder may now be used: check it, get callbacks
            model.fit(..., callbacks=run.callbacks)
            run.finish({"model.keras": model}, metrics, settings)

    Entering it takes the folder's lock (`exclusive_use`: one run per folder; Ctrl-C,
    SIGTERM and failed writes explained, with how to resume); with `resume`, a finished run
    of `epochs` epochs ends the command there (`check_not_finished`). `start` decides, once the data
    has loaded, whether the folder may be used (`prepare_output_dir`), refuses a resume with
    another split or other settings, records what makes the run (the backend, the versions,
    the device: `devices.provenance`), and makes the callbacks. `finish` writes the models,
    `history.csv` and, last, `metrics.json`, the run's end mark. `place` is a multi-process
    run's `(index, count)`: only process 0 writes outputs (`writes_outputs`); the others
    hold their folders from `start` on (`exclusive_use`). Contexts
    entered with `enter_context` (an `ExitStack`'s) stay open until the run ends.
    """

    def __init__(
        self, output_dir, resume, overwrite, dry_run, place=(0, 1), outputs=(), epochs=None
    ):
        super().__init__()
        self.output_dir, self.place, self.outputs = output_dir, place, outputs
        self.resume, self.overwrite, self.dry_run = resume, overwrite, dry_run
        self.epochs = epochs
        self.callbacks = []
        self.started = False
        self.provenance = {}  # what made the run (`start`), for metrics.json

    def __enter__(self):
        super().__enter__()
        shared_dir = self.output_dir  # every process reads the finished run's mark here
        if self.writes_outputs:
            self.output_dir = self.enter_context(exclusive_use(self.output_dir, self.place))
        else:
            # The other processes of a multi-process run take their folders in `start`, once
            # all have joined the run and process 0 holds the shared folder: one that made
            # the shared folder first would leave it behind after an early Ctrl-C.
            own_dir = process_folder(self.output_dir, self.place)
            self.enter_context(failures_explained(own_dir))
        if self.resume and not self.overwrite:
            try:
                check_not_finished(shared_dir, self.epochs)
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exception):
        # Stopped (Ctrl-C, an error) before a first epoch was backed up: the files this run
        # wrote so far belong to no run that can be resumed or used. Before `start`, the
        # folder may hold a finished run, which is left alone.
        folder = pathlib.Path(self.output_dir)
        if exception[0] is not None and self.started and not resumable(folder):
            if not (folder / "metrics.json").exists():
                for name in ("history-progress.csv", "settings.json", *self.outputs):
                    (folder / name).unlink(missing_ok=True)
                remove_tensorboard_logs(folder)
        return super().__exit__(*exception)

    @property
    def writes_outputs(self):
        """Whether this process writes the run's outputs (process 0 of a multi-process run)."""
        return self.place[0] == 0

    def start(self, split=None, settings=None, resumed_settings=()):
        """Prepare the folder once the data has loaded; make `callbacks`; return the folder.

        `split` is `(training files, validation files)` and `resumed_settings` names the
        keys of `settings` that a resumed run must keep; both are recorded for a later
        resume (`split.json`, `settings.json`) and checked against the interrupted run's.
        `settings.json` also records what makes the run (`provenance`: the backend, the
        versions, the device), which a resume may change (`resumed_provenance` says so).
        """
        if not self.writes_outputs:  # see `__enter__`
            self.output_dir = self.enter_context(exclusive_use(self.output_dir, self.place))
        self.output_dir = prepare_output_dir(
            self.output_dir, self.resume, self.overwrite, self.dry_run, self.outputs
        )
        # From here on the folder is this run's: what it writes goes if it stops early
        # (`__exit__`), split.json and settings.json too, even before the callbacks exist;
        # a refused resume leaves the interrupted run's as they were.
        self.started = True
        made_with = devices.provenance()
        self.provenance, notice = resumed_provenance(self.output_dir, made_with)
        try:
            if split is not None:
                check_same_split(self.output_dir, *split)
            checked = {key: settings[key] for key in resumed_settings}
            check_same_settings(self.output_dir, checked, self.provenance)
        except ValueError:
            self.started = False
            raise
        if notice:  # once the resume is known to go on
            print(notice, flush=True)
        self.callbacks = training_callbacks(self.output_dir, logs=self.writes_outputs)
        return self.output_dir

    def temporary_folder(self, **where):
        """A temporary folder removed when the run ends (`tempfile.TemporaryDirectory`)."""
        return self.enter_context(tempfile.TemporaryDirectory(**where))

    def cache_folder(self):
        """A folder for caches too large for memory, inside the output folder, removed at the end.

        A killed run's cache folder is removed by the next run's `prepare_output_dir`.
        """
        return self.temporary_folder(dir=self.output_dir, prefix=".cache-")

    def history(self):
        """The rows logged per epoch, across interruptions (`final_history`)."""
        return final_history(self.output_dir)

    def write_csv(self, rows, name, fieldnames=None):
        """Write rows as the CSV file `name` of the output folder, atomically (process 0 only)."""
        if self.writes_outputs:
            write_csv(rows, self.output_dir / name, fieldnames)

    def finish(self, models, metrics, settings):
        """Save `models` (file name to model) and `history.csv`, then `metrics.json`, last.

        `metrics.json` holds `metrics`, the number of epochs, the seconds of each epoch run
        in this process (`epoch_seconds`) and their mean, what made the run (`provenance`:
        the backend, versions, device) and `settings`. Other processes of
        a multi-process run write nothing and drop their resume state. Returns whether this
        process wrote outputs.
        """
        if not self.writes_outputs:
            finish_run(self.output_dir, None)
            return False
        history_rows = self.history()
        for name, model in models.items():
            save_model(model, self.output_dir / name)
        columns = None if history_rows else ["epoch", "loss", "val_loss"]
        self.write_csv(history_rows, "history.csv", columns)
        timer = self.callbacks[-1]  # the EpochTimer
        record = {**metrics, "epochs": len(history_rows), "seconds_per_epoch": timer.mean()}
        record["epoch_seconds"] = [round(seconds, 4) for seconds in timer.durations]
        finish_run(self.output_dir, {**record, **self.provenance, **settings})
        return True
