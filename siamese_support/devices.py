"""TensorFlow's quiet start, the device line, `tf.distribute` strategies and thread settings.

These decide where and how the tutorials' code runs, not what it computes, so they live
here. TensorFlow is imported inside the functions that need it.
"""

import contextlib
import os
import sys


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


def gpu_visible():
    """Whether TensorFlow sees a GPU."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def configure_threads(requested, network):
    """Set how many threads TensorFlow gives one operation; return the number in effect.

    `requested` None picks 1 for the MLP on a machine without a GPU, and TensorFlow's own
    choice (0: one thread per core) otherwise. Each of the MLP's matrix products (128 pairs
    by 784 by 128) is too small to gain from being split: on 2 cores, one thread per
    operation, with the two branches running side by side, measured 0.53-0.64 s per
    training epoch against 0.79-0.97 s. The convnet's products do gain (43-57 s per epoch
    against 75 s with one thread).

    TensorFlow reads the setting when it starts, so this comes before its first operation;
    in a process where it already runs (`main()` called again), its setting stays.
    """
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

    The previous global policy is restored afterwards, so that a script's `main()` called
    inside another program leaves it as it was.
    """
    import keras

    previous = keras.mixed_precision.dtype_policy()
    try:
        if enabled:
            keras.mixed_precision.set_global_policy("mixed_float16")
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
