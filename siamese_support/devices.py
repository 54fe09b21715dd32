"""TensorFlow's quiet start, the device line, distribution over devices and processes, threads.

These decide where and how the tutorials' code runs, not what it computes, so they live
here. TensorFlow and JAX are imported inside the functions that need them: both scripts
run under any Keras backend, without TensorFlow installed.
"""

import collections
import contextlib
import importlib.util
import json
import os
import platform
import sys

# keras-team/keras#20585: Keras 3's `fit()` fails under MultiWorkerMirroredStrategy.
MULTI_WORKER_ISSUE = "https://github.com/keras-team/keras/issues/20585"
CLUSTER_VARIABLES = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)


@contextlib.contextmanager
def stderr_silenced():
    """Point file descriptor 2 at /dev/null for the duration of the block.

    TensorFlow's C++ code and the JPEG library write to the descriptor itself, past
    Python's `sys.stderr`.
    """
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)


@contextlib.contextmanager
def quiet_tensorflow_start():
    """Import Keras and TensorFlow inside this block to skip their start-up notices.

    TensorFlow prints them (CUDA probes, oneDNN) to the stderr descriptor, some before its
    own log level is read; the first device query loads the CUDA libraries, which log too,
    so it is made here as well.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with stderr_silenced():
        yield
        if "tensorflow" in sys.modules:
            sys.modules["tensorflow"].config.list_physical_devices("GPU")


def choose_strategy(name):
    """The `tf.distribute` strategy for `--distribute` and a line describing it.

    `auto` mirrors over the GPUs when more than one is visible. `mirrored` without GPUs
    mirrors over the logical CPU devices (useful for testing the distributed path).
    """
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "none"
    device = f"GPU ({len(gpus)} visible)" if gpus else "CPU"
    if name == "none":
        return tf.distribute.get_strategy(), f"Device: {device}"
    devices = gpus or tf.config.list_logical_devices("CPU")
    strategy = tf.distribute.MirroredStrategy([logical.name for logical in devices])
    replicas = strategy.num_replicas_in_sync
    return strategy, f"Device: {device}, MirroredStrategy over {replicas} replicas"


class Placement(
    collections.namedtuple(
        "Placement", ["scope", "line", "process_index", "process_count", "device_count"]
    )
):
    """Where a script trains: `scope()` to build and fit in, the first output line, this
    process's place among the processes of a multi-process run, and the number of devices
    each batch is spread over: `tf.distribute`'s replicas, or the devices of Keras's
    `DataParallel` (1 otherwise). Only JAX's input pipelines split batches themselves."""

    @property
    def share(self):
        """`(process_index, process_count, device_count)`: which part of each batch to feed."""
        return self.process_index, self.process_count, self.device_count

    @property
    def loss_shares(self):
        """How many devices' shares of a batch a loss sees at once: all of `DataParallel`'s
        under JAX; 1 otherwise (`tf.distribute` runs the loss once per replica's share)."""
        return self.device_count if keras_backend() == "jax" else 1


def set_random_seed(seed):
    """`keras.utils.set_random_seed`, without TensorFlow's start-up notices under JAX or PyTorch.

    Keras seeds TensorFlow too whenever it is installed, whatever the backend (so that
    `tf.data` shuffles repeat), which imports it: the notices that import prints are
    silenced as for the TensorFlow backend.
    """
    import keras

    with quiet_tensorflow_start():
        keras.utils.set_random_seed(seed)


# The backends Keras 3 accepts, each with the library it needs; the scripts train on the
# first three (Keras's numpy and openvino backends run models but cannot train them).
KERAS_BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
KERAS_BACKENDS.update(numpy="numpy", openvino="openvino")
TRAINING_BACKENDS = ("tensorflow", "jax", "torch")


def backend_setting():
    """`(name, how it was chosen)` of the Keras backend, read as Keras reads it, unimported.

    `KERAS_BACKEND` first, then the "backend" of `keras.json` in `KERAS_HOME` (default
    `~/.keras`, or `/tmp/.keras` where the home folder is read-only), then TensorFlow,
    Keras's default. The second item names the choice for a message.
    """
    name = os.environ.get("KERAS_BACKEND", "")
    if name:
        return name, f"KERAS_BACKEND={name}"
    home = os.path.expanduser("~")
    if not os.access(home, os.W_OK):
        home = "/tmp"
    path = os.path.join(os.environ.get("KERAS_HOME") or os.path.join(home, ".keras"), "keras.json")
    try:
        with open(path) as stream:
            name = json.load(stream).get("backend")
    except (OSError, ValueError, AttributeError):
        name = None
    if name:
        return str(name), f'the backend "{name}" of {path}'
    return "tensorflow", "Keras's default backend, tensorflow,"


def configured_backend():
    """The name of the Keras backend a process will use, without importing Keras."""
    return backend_setting()[0]


def require_backend(prog, supported=TRAINING_BACKENDS):
    """Exit with one line and code 2 unless Keras is set to a `supported` backend that is
    installed, before Keras's own import fails with a traceback; return its name."""
    name, chosen = backend_setting()
    choices = " or ".join((", ".join(supported[:-1]), supported[-1])) if supported[1:] else name
    if name not in KERAS_BACKENDS:
        accepted = ", ".join(KERAS_BACKENDS)
        problem = f"{chosen} is not a Keras backend (Keras has {accepted})"
    elif name not in supported:
        problem = f"{chosen} is a Keras backend this script cannot train on"
    elif importlib.util.find_spec(KERAS_BACKENDS[name]) is None:
        library = KERAS_BACKENDS[name]
        problem = f"{chosen} needs {library}, which is not installed (pip install {library})"
    else:
        return name
    print(f"{prog}: error: {problem}; choose {choices} with KERAS_BACKEND", file=sys.stderr)
    sys.exit(2)


def keras_backend():
    """The name of the Keras backend in use: "tensorflow", "jax" or "torch"."""
    import keras

    return keras.backend.backend()


def steps_per_call(steps):
    """`steps`, or 1 where Keras cannot run several steps per call.

    Keras's multi-step loop fails under `tf.distribute.MirroredStrategy` in TF 2.21 (an
    unfed placeholder in its while loop), and the PyTorch backend has none.
    """
    backend = keras_backend()
    if backend == "torch":
        return 1
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.distribute.has_strategy():
            return 1
    return steps


# Training data kept on an accelerator may take this share of its free memory; the rest is
# the model's, its activations' and the optimizer's.
device_share_for_data = 0.5


def keeps_data_on_device(nbytes, device_count=1):
    """Whether `nbytes` of training data go to the device once, to be gathered there by index.

    Only under JAX, on one device (`DataParallel` shards host batches over several), and on
    an accelerator whose free memory holds them (`device_share_for_data`). Each batch is
    then one compiled gather on the device, not a gather in NumPy and a copy from the host.
    A CPU's "device" is the host's memory: there the NumPy batches stay (measured quicker),
    and a copy of the data would only add to the memory.
    """
    if keras_backend() != "jax" or device_count > 1:
        return False
    import jax

    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return False
    stats = device.memory_stats() or {}
    free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
    return nbytes <= device_share_for_data * free


def choose_steps_per_execution(requested, default, examples, batch_size, placement):
    """Training steps per call into the compiled loop (`compile(steps_per_execution=...)`).

    An epoch is `examples` in batches of `batch_size`. `requested` (`--steps-per-execution`)
    None gives `default`, at most an epoch's steps; a `default` pair is `(on a CPU, on an
    accelerator)` (`accelerator_visible`). Keras runs one step per call under PyTorch and
    under `tf.distribute.MirroredStrategy` (`steps_per_call`): there it is 1. A requested
    number above an epoch's steps, or above 1 where Keras cannot run it, is a `ValueError`.
    `placement` is `choose_placement`'s.
    """
    steps_per_epoch = -(-examples // batch_size)
    with placement.scope():
        one_at_a_time = steps_per_call(2) == 1
    if requested is None:
        if isinstance(default, tuple):
            default = default[accelerator_visible()]
        return 1 if one_at_a_time else max(1, min(default, steps_per_epoch))
    if requested > steps_per_epoch:
        raise ValueError(
            f"--steps-per-execution {requested} is more than the {steps_per_epoch} training "
            f"step{'s' * (steps_per_epoch != 1)} of an epoch"
        )
    if requested > 1 and one_at_a_time:
        why = "Keras's PyTorch backend" if keras_backend() == "torch" else "MirroredStrategy"
        raise ValueError(
            f"--steps-per-execution {requested}: {why} runs one training step per call "
            "(give 1, or leave the option out)"
        )
    return requested


def process_place(distribute):
    """This process's `(index, count)`: `(0, 1)` unless `distribute` is "multi-process".

    A multi-process run reads its place from the `KERAS_DISTRIBUTION_*` variables, which
    `keras.distribution.initialize()` reads too; a missing or malformed one is a
    `ValueError` naming it, before anything else starts.
    """
    if distribute != "multi-process":
        return 0, 1
    refuse_unsupported(distribute, keras_backend())
    values = {}
    for name in CLUSTER_VARIABLES:
        values[name] = os.environ.get(name, "").strip()
        if not values[name]:
            raise ValueError(
                f"--distribute multi-process needs {name} (see tools/launch_local_workers.py)"
            )
    addresses = values["KERAS_DISTRIBUTION_JOB_ADDRESSES"].split(",")
    for address in addresses:
        host, _, port = address.strip().rpartition(":")
        if not (host and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(
                f"KERAS_DISTRIBUTION_JOB_ADDRESSES: {address.strip()!r} is not HOST:PORT"
            )
    numbers = {}
    for name in CLUSTER_VARIABLES[1:]:
        try:
            numbers[name] = int(values[name])
        except ValueError:
            raise ValueError(f"{name} must be a whole number, got {values[name]!r}") from None
    count, index = numbers.values()
    if count < 1:
        raise ValueError(f"KERAS_DISTRIBUTION_NUM_PROCESSES must be at least 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(
            f"KERAS_DISTRIBUTION_PROCESS_ID must be from 0 to {count - 1}, got {index}"
        )
    if len(addresses) > 1 and len(addresses) != count:
        raise ValueError(
            f"KERAS_DISTRIBUTION_JOB_ADDRESSES lists {len(addresses)} addresses for "
            f"{count} processes"
        )
    return index, count


def refuse_unsupported(distribute, backend):
    """A `ValueError` when `backend` cannot honour `--distribute distribute`."""
    if distribute == "multi-process" and backend == "tensorflow":
        raise ValueError(
            "--distribute multi-process needs KERAS_BACKEND=jax: Keras 3's fit() fails "
            f"under TensorFlow's MultiWorkerMirroredStrategy ({MULTI_WORKER_ISSUE})"
        )
    if distribute == "multi-process" and backend != "jax":
        raise ValueError(
            f"--distribute multi-process needs KERAS_BACKEND=jax (the backend is {backend})"
        )
    if distribute == "mirrored" and backend != "tensorflow":
        raise ValueError(
            f"--distribute mirrored is TensorFlow's MirroredStrategy: it needs "
            f"KERAS_BACKEND=tensorflow (the backend is {backend})"
        )


def place_training(distribute, batch_size, seed):
    """`choose_placement`, said in one line on stdout, then every random seed set
    (`set_random_seed`: Python, NumPy and the backend): a script's start of training."""
    placement = choose_placement(distribute, batch_size)
    print(placement.line, flush=True)
    set_random_seed(seed)
    return placement


def choose_placement(distribute, batch_size):
    """Where a script trains, on whichever Keras backend runs: a `Placement`.

    TensorFlow: `choose_strategy`. JAX: one device, Keras's `DataParallel` over the local
    devices when `auto` finds several, or over every device of every process with
    `multi-process` (after `keras.distribution.initialize()`; CPUs exchange results with
    gloo). PyTorch: one device. An option the backend cannot honour is a `ValueError`, and
    so is a `batch_size` that does not split evenly over the devices.
    """
    import keras

    backend = keras.backend.backend()
    refuse_unsupported(distribute, backend)
    if backend == "tensorflow":
        strategy, line = choose_strategy(distribute)
        replicas = strategy.num_replicas_in_sync
        return Placement(strategy.scope, f"Backend: tensorflow. {line}", 0, 1, replicas)
    if backend != "jax":
        import torch

        device = "GPU" if torch.cuda.is_available() else "CPU"
        line = f"Backend: {backend}. Device: {device}"
        return Placement(contextlib.nullcontext, line, 0, 1, 1)
    import jax

    index, count = process_place(distribute)
    if distribute == "multi-process":
        # CPUs have no collectives of their own; gloo is what JAX offers for them.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # Counted from the start of the join: a Ctrl-C in the middle of it leaves JAX's
        # client running, whose exit handler would wait for the others (`leave`).
        _processes_started.append(count)
        try:
            keras.distribution.initialize()
        except Exception as error:  # JAX gives up on the others after its own timeout
            coordinator = os.environ["KERAS_DISTRIBUTION_JOB_ADDRESSES"].split(",")[0]
            raise ValueError(
                f"process {index} of {count} could not join the run at {coordinator} "
                f"({str(error).strip().splitlines()[0] if str(error).strip() else error!r})"
            ) from None
    device = jax.devices()[0].platform.upper()
    devices = keras.distribution.list_devices()
    line = f"Backend: jax. Device: {device}"
    if distribute == "none" or len(devices) == 1:
        return Placement(contextlib.nullcontext, line, index, count, 1)
    if batch_size % len(devices):
        raise ValueError(
            f"--batch-size {batch_size} is the batch of all {len(devices)} devices together: "
            "it must be a multiple of the number of devices"
        )
    # Each process feeds its own share of every batch (see pipelines.PairBatches).
    distribution = keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
    line += f", DataParallel over {len(devices)} devices"
    if count > 1:
        line += f" in {count} processes (this is process {index})"
    return Placement(distribution.scope, line, index, count, len(devices))


_processes_started = []


def lost_process(error):
    """Whether `error` is JAX's report that a collective operation lost another process.

    Each step of a multi-process run exchanges results with every other process; when one
    dies, the others' next exchange fails ("Gloo AllGather failed ... Connection reset by
    peer") with JAX's runtime error, or its status as a `ValueError`.
    """
    if not _processes_started:
        return False
    if type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError"):
        return True
    # JAX's host-to-host gathers re-raise the runtime's status as a ValueError.
    status = str(error).split(":", 1)[0]
    return isinstance(error, ValueError) and status in ("UNKNOWN", "INTERNAL", "UNAVAILABLE")


def leave(code):
    """Return `code` for the process's exit, or, after a failed multi-process run, exit now.

    At exit JAX waits for every process at a shutdown barrier; after another process died
    that wait lasts until its missed heartbeats time out (100 s seen here) and ends in an
    abort with a stack dump. A failed run has said what happened already: it skips that.
    After Ctrl-C or SIGTERM (codes 130, 143), which the launcher gives every process, the
    others are stopping too: the barrier is given `interrupted_shutdown_seconds`, so that
    process 0, which hosts JAX's coordination, does not leave before them (they would
    abort, with a stack dump, before removing what they wrote).
    """
    if code and _processes_started:
        sys.stdout.flush()
        sys.stderr.flush()
        if code in (130, 143):
            _shut_down_within(interrupted_shutdown_seconds)
        os._exit(code)
    return code


# How long a process of an interrupted multi-process run waits for the others at exit.
interrupted_shutdown_seconds = 5.0


def _shut_down_within(seconds):
    """JAX's shutdown barrier, given `seconds` at most: it may wait for a process that is stuck."""
    import threading

    import jax

    def shut_down():
        with contextlib.suppress(Exception):  # a join that was interrupted half-way
            jax.distributed.shutdown()

    waiting = threading.Thread(target=shut_down, daemon=True)
    waiting.start()
    waiting.join(seconds)


def provenance():
    """What a run is made with, to record beside its figures (`metrics.json`, `settings.json`).

    A dict: `backend` (the Keras backend), `versions` (of Python, Keras, the backend's
    libraries, `jax` and `jaxlib` under JAX, and NumPy), `device` (what the backend computes
    on: "CPU", or the GPU's name as its driver gives it, such as "NVIDIA H100 80GB HBM3";
    several kinds are joined with commas) and `device_count` (how many of them this process
    sees). The same code and seed can give other figures under another of these.
    """
    import keras
    import numpy

    backend = keras.backend.backend()
    versions = {"python": platform.python_version(), "keras": keras.version()}
    if backend == "tensorflow":
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
        gpus = tf.config.list_physical_devices("GPU")
        # The physical device's name ("NVIDIA H100 80GB HBM3"); only GPUs have one.
        kinds = [
            tf.config.experimental.get_device_details(gpu).get("device_name", "GPU") for gpu in gpus
        ]
    elif backend == "jax":
        import jax
        import jaxlib

        versions.update(jax=jax.__version__, jaxlib=jaxlib.__version__)
        # A CPU's `device_kind` is "cpu"; a GPU's is its name.
        kinds = [device.device_kind for device in jax.local_devices() if device.platform != "cpu"]
        kinds = kinds or ["CPU"] * len(jax.local_devices())
    else:
        import torch

        versions["torch"] = torch.__version__
        kinds = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    versions["numpy"] = numpy.__version__
    kinds = kinds or ["CPU"]
    return {
        "backend": backend,
        "versions": versions,
        "device": ", ".join(sorted(set(kinds))),
        "device_count": len(kinds),
    }


def gpu_visible():
    """Whether TensorFlow sees a GPU."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def accelerator_visible():
    """Whether the Keras backend in use computes on a GPU (TensorFlow, JAX or PyTorch)."""
    backend = keras_backend()
    if backend == "tensorflow":
        return gpu_visible()
    if backend == "jax":
        import jax

        return jax.devices()[0].platform == "gpu"
    import torch

    return torch.cuda.is_available()


def configure_threads(requested, network):
    """Set how many threads TensorFlow gives one operation; return the number in effect.

    `requested` None picks 1 for the MLP on a machine without a GPU, and TensorFlow's own
    choice (0: one thread per core) otherwise. Each of the MLP's matrix products (128 pairs
    by 784 by 128) is too small to gain from being split: on 2 cores, one thread per
    operation, with the two branches running side by side, measured 0.53-0.64 s per
    training epoch against 0.79-0.97 s. The convnet's products do gain (43-57 s per epoch
    against 75 s with one thread).

    TensorFlow reads the setting when it starts, so this comes before its first operation;
    in a process where it already runs (`main()` called again), its setting stays. Under
    another Keras backend there is nothing to set: returns None, and a request is an error.
    """
    backend = keras_backend()
    if backend != "tensorflow":
        if requested is not None:
            raise ValueError(
                f"--intra-op-threads sets TensorFlow's thread pool: it needs "
                f"KERAS_BACKEND=tensorflow (the backend is {backend})"
            )
        return None
    import tensorflow as tf

    if requested is None:
        requested = 1 if network == "mlp" and not gpu_visible() else 0
    try:
        tf.config.threading.set_intra_op_parallelism_threads(requested)
    except RuntimeError:
        pass  # TensorFlow has started in this process: its setting stays.
    return tf.config.threading.get_intra_op_parallelism_threads()


def without_autotuning(dataset):
    """`dataset` with tf.data's autotuning thread turned off.

    The scripts' batches are gathers of rows already in memory, so there is little to tune,
    and the thread made the deletion of each used-up iterator wait: on 2 cores, about half
    of the MNIST epochs started 0.25-0.6 s late, idle, and 4 of 10 epochs of the triplet
    README's 300-pair run 1.4-1.9 s late. Without it, `AUTOTUNE` stands for a fixed
    parallelism (the number of cores, at most 16).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


@contextlib.contextmanager
def mixed_precision_policy(enabled):
    """Compute in float16 inside the block when `enabled`, with weights in float32.

    `enabled` None: when the backend computes on a GPU. Yields whether the block computes in
    float16.
    The previous global policy is restored afterwards, so that a script's `main()` called
    inside another program leaves it as it was.
    """
    import keras

    if enabled is None:
        enabled = accelerator_visible()
    previous = keras.mixed_precision.dtype_policy()
    try:
        if enabled:
            keras.mixed_precision.set_global_policy("mixed_float16")
        yield enabled
    finally:
        keras.mixed_precision.set_global_policy(previous)
