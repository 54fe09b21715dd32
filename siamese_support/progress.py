"""Progress of long work: Keras's progress bar in a terminal, a line every few percent in a log.

Decoding 12,032 images and running a frozen ResNet50 trunk over them takes twenty minutes
on a small CPU; a script that prints nothing meanwhile cannot be told from a hung one. In a
terminal the work shows Keras's own `Progbar` (and `fit()` and `predict()` their bars); in a
file or a pipe, where a bar would write thousands of carriage returns, one line every
`step_percent` percent. Keras is imported inside the functions that need it, so that the
scripts can import this module before Keras.
"""

import sys
import time

# Work done in less than this many seconds prints no lines in a log: short runs (a dry run's
# trunk pass takes 3 s) keep short logs, and long work has barely reached 5 % by then.
default_quiet_seconds = 5.0


def on_terminal(stream=None):
    """Whether `stream` (default: standard output) is a terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def fit_verbosity():
    """`fit()`'s `verbose`: 1 (Keras's progress bar) on a terminal, 2 (a line per epoch) if not.

    In a multi-process run, the processes other than process 0 print their line per epoch
    even on a terminal, so that the terminal shows one bar.
    """
    if not on_terminal():
        return 2
    import keras

    if keras.backend.backend() == "jax":
        import jax

        if jax.process_index() > 0:
            return 2
    return 1


class Progress:
    """How far a piece of work over `total` items is: a bar on a terminal, lines in a log.

    Call `advance(count)` as items are done. On a terminal, the label and Keras's `Progbar`
    show. In a file or a pipe, one flushed line per `step_percent` percent reached, such as
    `Trunk features: 3,010/12,032 images (25 %, 312 s)`, never one per item, and none
    before `quiet_seconds` (default `default_quiet_seconds`) have passed.
    """

    def __init__(self, what, total, unit="images", step_percent=5, quiet_seconds=None):
        if step_percent <= 0:
            raise ValueError(f"step_percent must be positive, got {step_percent}")
        self.what, self.total, self.unit = what, int(total), unit
        self.step_percent = step_percent
        self.quiet_seconds = default_quiet_seconds if quiet_seconds is None else quiet_seconds
        self.done = 0
        self.lines = 0  # lines printed in a log
        self.started = time.perf_counter()
        self._last_step = 0
        self._bar = None
        if on_terminal() and self.total > 0:
            import keras

            print(f"{what}: {self.total:,} {unit}", flush=True)
            self._bar = keras.utils.Progbar(self.total, unit_name=unit.rstrip("s") or "step")

    def advance(self, count):
        """Count `count` more items as done; show the progress if it has moved far enough."""
        self.update(self.done + count)

    def update(self, done):
        """Count `done` items as done in all (at most `total`); show the progress."""
        self.done = min(int(done), self.total)
        if self.total <= 0:
            return
        if self._bar is not None:
            self._bar.update(self.done, finalize=self.done >= self.total)
            return
        step = int(100 * self.done / self.total // self.step_percent)
        if step <= self._last_step:
            return
        self._last_step = step
        seconds = time.perf_counter() - self.started
        if seconds < self.quiet_seconds:
            return
        percent = 100 * self.done // self.total
        print(
            f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({percent} %, {seconds:.0f} s)",
            flush=True,
        )
        self.lines += 1


def predict_progress(what, total, batch_size, unit="images"):
    """Keyword arguments for `predict()` that show its progress: `verbose` and `callbacks`.

    On a terminal, Keras's own bar (`verbose=1`) under a line naming the work; in a file or
    a pipe, the lines of `Progress`, from a callback that counts `batch_size` items a batch
    (the last batch may be short).
    """
    import keras

    class PredictionProgress(keras.callbacks.Callback):
        """`Progress` driven by `predict()`'s batches."""

        def on_predict_begin(self, logs=None):
            self.progress = None
            if on_terminal():
                print(f"{what}: {total:,} {unit}", flush=True)
            else:
                self.progress = Progress(what, total, unit)

        def on_predict_batch_end(self, batch, logs=None):
            if self.progress is not None:
                self.progress.update((batch + 1) * batch_size)

    return {"verbose": 1 if on_terminal() else 0, "callbacks": [PredictionProgress()]}
