"""Where a script's epoch goes: compilation, the compiled step, and everything outside it.

Runs one of the two scripts in this process, exactly as its command line would (any of its
flags, under whichever Keras backend `KERAS_BACKEND` names), with timers around `fit()`:

- **traces**: how many times the training and validation steps were traced (their Python
  body runs once per trace under `jax.jit` and `tf.function`: a second trace is a
  recompilation, for example on a short last batch) and, under JAX, the seconds JAX spent
  tracing, lowering and compiling (its own `jax.monitoring` events);
- per epoch: its wall time, the time inside the calls of the training function, the part
  of it spent fetching batches (JAX and PyTorch, where Keras pulls them in Python; under
  TensorFlow the fetch runs inside the compiled loop), validation, and the rest, which is
  Keras's loop and the callbacks;
- **the benchmark step**: the same compiled training and validation functions called on one
  batch of the run, already fetched, on copies of the state (the run's weights are not
  touched), the median of `REPEATS` calls per step.

The last lines compare each epoch after the first with (training steps x the benchmark's
training step + validation steps x its validation step): 1.0 means no time outside the
compiled steps; then its training calls alone with (training steps x the training step),
which leaves out the validation and the callbacks at the epoch's end (the backup, the logs).
Calls are synchronised (`jax.block_until_ready`), so that each is timed whole; without that
JAX would overlap the Python loop with the device's work.

    python benchmarks/epoch_split.py mnist_siamese.py --limit 22699 --epochs 3 --no-plots \\
        --output-dir /tmp/split --overwrite
    KERAS_BACKEND=jax python benchmarks/epoch_split.py triplet_totally_looks_like.py \\
        --data-dir /tmp/tll300 --weights none --image-size 64 --batch-size 16 --epochs 3 \\
        --no-plots --output-dir /tmp/split --overwrite
"""

import importlib
import itertools
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
REPEATS = 20  # calls of the compiled functions on the fixed batch, after 3 untimed ones


def synchronised(value):
    """`value`, once the device has computed it (JAX dispatches asynchronously)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return jax.block_until_ready(value)
    return value


class TimedIterator:
    """An iterator whose `next()` calls are counted and timed; keeps the first batch."""

    def __init__(self, iterator, record):
        self.iterator, self.record = iterator, record

    def __iter__(self):
        return self

    def __next__(self):
        started = time.perf_counter()
        batch = next(self.iterator)
        self.record["fetch"] += time.perf_counter() - started
        self.record["batches"] += 1
        self.record.setdefault("first_batch", batch)
        return batch


class Split:
    """The measurements of one `fit()`: traces, and per epoch the parts of its time."""

    def __init__(self):
        self.traces = {"train": 0, "test": 0}
        self.epochs = []
        self.current = None
        self.batches = {}

    def new_record(self):
        return {"calls": 0.0, "fetch": 0.0, "batches": 0}

    def count_traces(self, model, kind):
        step = getattr(model, f"{kind}_step")

        def traced(*args, **kwargs):
            self.traces[kind] += 1
            return step(*args, **kwargs)

        setattr(model, f"{kind}_step", traced)

    def time_function(self, model, kind):
        function = getattr(model, f"{kind}_function")
        split = self

        def timed(*args):
            record = split.current[kind]
            *state, iterator = args
            if not hasattr(iterator, "_iterator_resource"):  # a Python iterator (not tf.data)
                iterator = TimedIterator(iterator, record)
            started = time.perf_counter()
            result = synchronised(function(*state, iterator))
            record["calls"] += time.perf_counter() - started
            if isinstance(iterator, TimedIterator):
                split.batches.setdefault(kind, record.get("first_batch"))
            return result

        timed.inner = function
        setattr(model, f"{kind}_function", timed)


def install(split):
    """Wrap `keras.Model.fit` so that every fit of the script is measured into `split`."""
    import keras

    class EpochParts(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            split.current = {"train": split.new_record(), "test": split.new_record()}
            split.current["started"] = time.perf_counter()
            split.current["traces_before"] = dict(split.traces)

        def on_test_begin(self, logs=None):
            split.current["test_started"] = time.perf_counter()

        def on_test_end(self, logs=None):
            split.current["validation"] = time.perf_counter() - split.current["test_started"]

        def on_epoch_end(self, epoch, logs=None):
            split.current["seconds"] = time.perf_counter() - split.current["started"]
            split.epochs.append(split.current)

    original_fit = keras.Model.fit

    def measured_fit(model, *args, callbacks=None, **kwargs):
        split.count_traces(model, "train")
        split.count_traces(model, "test")
        model.make_train_function()
        model.make_test_function()
        split.time_function(model, "train")
        split.time_function(model, "test")
        split.model = model
        callbacks = [*(callbacks or []), EpochParts()]  # last: the others' epoch ends count
        history = original_fit(model, *args, callbacks=callbacks, **kwargs)
        split.step = benchmark_steps(model, split)
        return history

    keras.Model.fit = measured_fit


def benchmark_steps(model, split):
    """Median seconds of one training and one validation step on a fixed batch of the run."""
    import keras

    backend = keras.backend.backend()
    per_call = getattr(model, "steps_per_execution", 1) or 1
    results = {}
    for kind in ("train", "test"):
        function = getattr(model, f"{kind}_function").inner
        batch = split.batches.get(kind)
        if backend == "tensorflow":
            import tensorflow as tf

            dataset = split.tf_batches[kind] if hasattr(split, "tf_batches") else None
            if dataset is None:
                dataset = model._benchmark_datasets[kind]
            iterator = iter(tf.data.Dataset.from_tensors(dataset).repeat())
            saved = [variable.numpy() for variable in model.variables]
            saved += [variable.numpy() for variable in model.optimizer.variables]
            durations = []
            for repeat in range(REPEATS + 3):
                started = time.perf_counter()
                function(iterator)
                if repeat >= 3:
                    durations.append((time.perf_counter() - started) / per_call)
            for variable, value in zip(
                [*model.variables, *model.optimizer.variables], saved, strict=True
            ):
                variable.assign(value)
        elif backend == "jax":
            import jax
            import jax.numpy as jnp

            what = dict(trainable_variables=True, non_trainable_variables=True)
            what.update(optimizer_variables=kind == "train", metrics_variables=True)
            state = jax.tree.map(jnp.copy, model._get_jax_state(**what))
            durations = []
            for repeat in range(REPEATS + 3):
                started = time.perf_counter()
                _, state = synchronised(function(state, itertools.repeat(batch)))
                if repeat >= 3:
                    durations.append((time.perf_counter() - started) / per_call)
        else:
            return None
        results[kind] = statistics.median(durations)
    return results


def keep_tf_batches(split):
    """Under TensorFlow, remember one batch of each dataset the script fits on."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    original_fit = keras.Model.fit

    def fit_keeping_batches(model, x=None, *args, validation_data=None, **kwargs):
        model._benchmark_datasets = {
            "train": next(iter(x)),
            "test": next(iter(validation_data)),
        }
        return original_fit(model, x, *args, validation_data=validation_data, **kwargs)

    keras.Model.fit = fit_keeping_batches


def report(split, compile_seconds):
    """Print the table of epochs and the comparison with the benchmark step."""
    print(f"traces: train_step {split.traces['train']}, test_step {split.traces['test']}")
    if compile_seconds is not None:
        print(f"JAX tracing, lowering and compiling: {compile_seconds:.2f} s in all")
    header = "epoch  seconds  train steps  in train calls  (fetching)  validation  outside"
    print(header + "  retraces")
    for number, epoch in enumerate(split.epochs, 1):
        train, test = epoch["train"], epoch["test"]
        validation = epoch.get("validation", 0.0)
        outside = epoch["seconds"] - train["calls"] - validation
        before = epoch["traces_before"]
        retraces = sum(split.traces[kind] - before[kind] for kind in before)
        if number < len(split.epochs):
            retraces = sum(
                split.epochs[number]["traces_before"][kind] - before[kind] for kind in before
            )
        print(
            f"{number:5d}  {epoch['seconds']:7.3f}  {train['batches'] or '-':>11}  "
            f"{train['calls']:14.3f}  {train['fetch']:10.3f}  {validation:10.3f}  "
            f"{outside:7.3f}  {retraces:8d}"
        )
        epoch["validation_batches"] = test["batches"]
    step = getattr(split, "step", None)
    if not step:
        print("benchmark step: not measured under this backend")
        return
    print(
        f"benchmark step: train {1000 * step['train']:.3f} ms, "
        f"validation {1000 * step['test']:.3f} ms (median of {REPEATS})"
    )
    steps = split.train_steps, split.validation_steps
    expected = steps[0] * step["train"] + steps[1] * step["test"]
    print(f"steps an epoch: {steps[0]} training, {steps[1]} validation")
    print(f"expected epoch from the benchmark step: {expected:.3f} s")
    for number, epoch in enumerate(split.epochs[1:], 2):
        training = epoch["train"]["calls"] / (steps[0] * step["train"])
        print(
            f"epoch {number}: {epoch['seconds'] / expected:.2f} x the benchmark steps; its "
            f"training steps alone: {training:.2f} x"
        )


def main(argv):
    """Run `SCRIPT ARGS...` under the timers; return its exit code."""
    if not argv or not argv[0].endswith(".py"):
        print("usage: python benchmarks/epoch_split.py SCRIPT.py [its flags]", file=sys.stderr)
        return 2
    compile_seconds = []
    import keras

    if keras.backend.backend() == "jax":
        import jax

        def listen(event, duration, **kwargs):
            if event.startswith("/jax/core/compile/"):
                compile_seconds.append(duration)

        jax.monitoring.register_event_duration_secs_listener(listen)
    split = Split()
    install(split)
    keep_tf_batches(split)
    original_fit = keras.Model.fit

    def counting_fit(model, x=None, *args, validation_data=None, **kwargs):
        split.train_steps, split.validation_steps = len(x), len(validation_data)
        return original_fit(model, x, *args, validation_data=validation_data, **kwargs)

    keras.Model.fit = counting_fit
    script = importlib.import_module(pathlib.Path(argv[0]).stem)
    code = script.main(argv[1:])
    report(split, sum(compile_seconds) if compile_seconds else None)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
