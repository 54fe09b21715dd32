"""Siamese MLP trained with a contrastive loss on pairs of MNIST digits (Keras 3).

A port of the classic Keras example `examples/mnist_siamese.py`, after Hadsell, Chopra &
LeCun (2006), "Dimensionality Reduction by Learning an Invariant Mapping". Two copies of one
embedding network read a pair of digits; the Euclidean distance between their embeddings is
trained to be small for two images of the same digit and at least `margin` for different
digits. The original reports 97.2 % test-pair accuracy after 20 epochs.

The sections follow the original: load data, make pairs, model, loss, train, inspect.
What this port adds (command line, evaluation, plots, safe outputs) comes after them.

    python mnist_siamese.py                      # the example: download MNIST, 20 epochs
    python mnist_siamese.py --data mnist.npz     # a local copy of Keras's mnist.npz
    python mnist_siamese.py --dry-run            # 1 epoch on the small subset in data/
"""

import argparse
import contextlib
import csv
import gzip
import json
import os
import pathlib
import shutil
import struct
import sys
import tempfile
import time

import numpy as np

# TensorFlow prints start-up notices (CUDA probes, oneDNN) straight to the stderr file
# descriptor, some before its own log level is read, so they are muted at that level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def _stderr_silenced():
    """Point file descriptor 2 at /dev/null for the duration of the block."""
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)


with _stderr_silenced():
    import keras
    import tensorflow as tf
    from keras import layers, ops

    # The first device query loads the CUDA libraries, which log as well.
    tf.config.list_physical_devices("GPU")

# Defaults of the original example.
num_classes = 10
epochs = 20
batch_size = 128
margin = 1.0
learning_rate = 0.001  # RMSprop's default in Keras
distance_threshold = 0.5  # a pair is called "same digit" below this distance
dry_run_batch_size = 32

SCRIPT_DIRECTORY = pathlib.Path(__file__).resolve().parent
DRY_RUN_DATA = SCRIPT_DIRECTORY / "data" / "mnist-tiny.npz"
DEFAULT_OUTPUT_DIR = pathlib.Path("runs") / "mnist_siamese"
DRY_RUN_OUTPUT_DIR = pathlib.Path("runs") / "mnist_siamese_dry_run"
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
# Batches of pairs that one call into the compiled training loop runs. Fewer round trips
# between Python and TensorFlow is where most of the CPU time of this small model goes.
steps_per_execution = 32
evaluation_batch_size = 1024


class DownloadError(RuntimeError):
    """The MNIST download failed (no network, or a corrupted file)."""


# ---------------------------------------------------------------------------
# Load data
# ---------------------------------------------------------------------------


def load_mnist(path=None):
    """Return `(x_train, y_train), (x_test, y_test)` as uint8 arrays.

    `path` is a file in the layout of Keras's `mnist.npz`, or a folder holding the four
    official `*-idx?-ubyte.gz` files; `None` downloads MNIST through Keras (cached under
    `~/.keras/datasets`, checked against its published hash). Images stay uint8 here and are
    scaled to float32 in [0, 1] batch by batch in the input pipeline, which keeps a quarter
    of the memory a float32 copy of the dataset would take.
    """
    if path is None:
        try:
            (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        except Exception as error:  # Keras raises a bare Exception on fetch failure
            raise DownloadError(
                f"could not download MNIST ({_one_line(error)}); without a network, "
                "pass --data PATH (a mnist.npz file or a folder of the four "
                "*-idx?-ubyte.gz files) or try --dry-run"
            ) from None
        arrays = {"x_train": x_train, "y_train": y_train}
        arrays.update({"x_test": x_test, "y_test": y_test})
    else:
        path = pathlib.Path(path)
        if path.is_dir():
            arrays = _read_idx_folder(path)
        elif path.is_file():
            arrays = _read_npz(path)
        else:
            raise ValueError(f"--data {path}: no such file or folder")
    return _validated(arrays, str(path) if path else "the MNIST download")


def _read_npz(path):
    """Read the four arrays of a `mnist.npz`-style file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ValueError("it holds a single array, not named arrays")
            missing = [name for name in IDX_FILES if name not in archive.files]
            if missing:
                raise KeyError(", ".join(missing))
            return {name: archive[name] for name in IDX_FILES}
    except KeyError as error:
        raise ValueError(
            f"--data {path}: missing arrays {error.args[0]} (expected x_train, "
            "y_train, x_test, y_test as in Keras's mnist.npz)"
        ) from None
    except Exception as error:
        raise ValueError(f"--data {path}: not a readable .npz file ({_one_line(error)})") from None


def _read_idx_folder(folder):
    """Read the four official MNIST files (`*-idx?-ubyte.gz`) from `folder`."""
    missing = [name for name in IDX_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"--data {folder}: the folder lacks {', '.join(missing)} (it needs the four "
            "official MNIST files, or pass a mnist.npz file)"
        )
    return {key: read_idx(folder / name) for key, name in IDX_FILES.items()}


def read_idx(path):
    """Read one gzip-compressed IDX file of unsigned bytes (the MNIST format)."""
    try:
        with gzip.open(path, "rb") as stream:
            content = stream.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: not a readable gzip file ({error})") from None
    if len(content) < 4 or content[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    dimensions = content[3]
    header_size = 4 + 4 * dimensions
    if len(content) < header_size:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{dimensions}I", content[4:header_size])
    expected = int(np.prod(shape))
    if len(content) - header_size != expected:
        raise ValueError(
            f"{path}: holds {len(content) - header_size} bytes of data, "
            f"its header announces {expected}"
        )
    return np.frombuffer(content, np.uint8, offset=header_size).reshape(shape)


def _validated(arrays, source):
    """Check shapes, lengths and value ranges; return the arrays as uint8."""
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if images.ndim != 3 or min(images.shape) == 0:
            raise ValueError(
                f"{source}: x_{split} has shape {images.shape}, expected "
                "(count, height, width), e.g. (60000, 28, 28)"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"{source}: y_{split} has shape {labels.shape}, expected "
                f"({len(images)},), one label per image of x_{split}"
            )
        if not np.issubdtype(images.dtype, np.number) or (images.min() < 0 or images.max() > 255):
            raise ValueError(
                f"{source}: x_{split} must hold pixel values 0-255, found {images.dtype} values"
            )
        if not np.issubdtype(labels.dtype, np.integer) or (
            labels.min() < 0 or labels.max() >= num_classes
        ):
            raise ValueError(f"{source}: y_{split} must hold integer digit classes 0-9")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(
            f"{source}: training images are {arrays['x_train'].shape[1:]}, "
            f"test images {arrays['x_test'].shape[1:]}; they must match"
        )
    x_train, y_train, x_test, y_test = (np.asarray(arrays[name], np.uint8) for name in IDX_FILES)
    return (x_train, y_train), (x_test, y_test)


def _one_line(error):
    """The first line of an exception's message."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------
# Make pairs
# ---------------------------------------------------------------------------


def create_pairs(x, digit_indices, rng=None):
    """Positive and negative pairs of images, alternating, as in the original example.

    For each class d and each i < n, where n is one less than the smallest class count,
    the pair (i-th, (i+1)-th image of d) is positive and the pair (i-th image of d, i-th
    image of a random other class) is negative; labels alternate 1, 0. Label 1 means "same
    digit", the Keras example's convention; the paper's Y is the opposite (Y = 0 similar).

    Unlike the original, the pairs are returned as indices into `x` (an int32 array of
    shape (pairs, 2)) instead of copies of the images: the images are gathered batch by
    batch in the input pipeline, so the pairs cost 8 bytes each instead of 6 KB.

    Args:
        x: the images the indices refer to (only their count is used).
        digit_indices: for each class, the indices of its images, in order.
        rng: a `numpy.random.Generator`, or a seed, for the choice of negative classes.

    Returns:
        `(pairs, labels)`: int32 array (2 * num_classes * n, 2) and float32 labels.
    """
    rng = np.random.default_rng(rng)
    class_count = len(digit_indices)
    if class_count < 2:
        raise ValueError("create_pairs needs at least two classes")
    smallest = min(len(indices) for indices in digit_indices)
    n = smallest - 1
    if n < 1:
        sizes = {d: len(indices) for d, indices in enumerate(digit_indices)}
        raise ValueError(
            f"every class needs at least two images to make a positive pair; "
            f"images per class: {sizes}"
        )
    # Row d holds the first n + 1 images of class d.
    table = np.stack([np.asarray(indices[: n + 1]) for indices in digit_indices])
    if table.min() < 0 or table.max() >= len(x):
        raise ValueError("digit_indices refer to images outside x")
    classes = np.arange(class_count)[:, None]
    # The same shift rule as the original: another class, chosen uniformly.
    shift = rng.integers(1, class_count, size=(class_count, n))
    other_class = (classes + shift) % class_count
    positions = np.arange(n)
    positive = np.stack([table[:, :n], table[:, 1:]], axis=-1)
    negative = np.stack([table[:, :n], table[other_class, positions]], axis=-1)
    # Interleave so that each class contributes positive, negative, positive, ...
    pairs = np.stack([positive, negative], axis=2).reshape(-1, 2).astype(np.int32)
    labels = np.tile(np.array([1.0, 0.0], np.float32), class_count * n)
    return pairs, labels


def make_pair_dataset(images, pairs, labels=None, batch_size=batch_size, seed=None):
    """A `tf.data` pipeline of `((image_a, image_b), label)` batches from index pairs.

    The uint8 images stay in one tensor; each batch gathers its pairs and scales them to
    float32 in [0, 1]. With `seed` the pairs come in a new order every epoch, as `fit()`
    shuffles arrays by default; without it they keep their order (evaluation).
    """
    image_table = tf.convert_to_tensor(images)
    pair_table = tf.convert_to_tensor(pairs)
    label_table = None if labels is None else tf.convert_to_tensor(labels)
    if seed is None:
        batches = tf.data.Dataset.range(len(pairs)).batch(batch_size)
    else:
        batches = shuffled_index_batches(len(pairs), batch_size, seed)

    def gather_pairs(indices):
        batch_pairs = tf.gather(pair_table, indices)
        pair_images = tf.cast(tf.gather(image_table, batch_pairs), tf.float32) / 255.0
        inputs = (pair_images[:, 0], pair_images[:, 1])
        if label_table is None:
            return (inputs,)
        return inputs, tf.gather(label_table, indices)[:, None]

    dataset = batches.map(gather_pairs, num_parallel_calls=tf.data.AUTOTUNE)
    return without_autotuning(dataset.prefetch(tf.data.AUTOTUNE))


def without_autotuning(dataset):
    """`dataset` with tf.data's autotuning thread turned off.

    A batch here is a gather of under 200 KB, so there is little to tune, and the thread
    made the deletion of each used-up iterator wait: on 2 cores, about half the training
    epochs and some validations started 0.25-0.6 s late, idle. Without it, `AUTOTUNE`
    stands for a fixed parallelism (the number of cores, at most 16).
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def shuffled_index_batches(count, batch_size, seed):
    """Batches of the indices 0 to count - 1, in a new random order every epoch.

    The order is one permutation drawn inside the pipeline at the start of each pass, which
    costs `count` integers; `Dataset.shuffle` would hold `count` separate elements in its
    buffer, tens of megabytes for MNIST's 108,400 training pairs.
    """

    def permutation(random_value):
        pass_seed = tf.stack([random_value, tf.constant(seed, tf.int64)])
        return tf.random.experimental.stateless_shuffle(tf.range(count), seed=pass_seed)

    def batched(order):
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    # Dataset.random draws a new value on each pass, so each epoch gets its own order.
    pass_values = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
    orders = pass_values.map(permutation, num_parallel_calls=tf.data.AUTOTUNE)
    # The length is stated because a pipeline built with flat_map has none that Keras can
    # read, and without one Keras warns at the end of every epoch.
    batch_count = -(-count // batch_size)
    return orders.flat_map(batched).apply(tf.data.experimental.assert_cardinality(batch_count))


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def create_base_network(input_shape):
    """The embedding network shared by both branches (the example's MLP)."""
    inputs = keras.Input(shape=input_shape)
    x = layers.Flatten()(inputs)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.1)(x)
    x = layers.Dense(128, activation="relu")(x)
    return keras.Model(inputs, x, name="base_network")


def create_conv_base_network(input_shape):
    """The convolutional embedding network (`--network conv`), on 28×28×1 input."""
    inputs = keras.Input(shape=input_shape)
    x = layers.Reshape((*input_shape, 1))(inputs)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.Conv2D(32, 3, activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    return keras.Model(inputs, x, name="base_network")


def euclidean_distance(vects):
    """Euclidean distance between two batches of vectors, kept away from zero.

    The square root's gradient is infinite at 0, so the sum of squares is floored at the
    backend epsilon (the original's `K.maximum(sum_square, K.epsilon())`).
    """
    x, y = vects
    sum_square = ops.sum(ops.square(x - y), axis=1, keepdims=True)
    return ops.sqrt(ops.maximum(sum_square, keras.config.epsilon()))


@keras.saving.register_keras_serializable(package="mnist_siamese")
class EuclideanDistance(layers.Layer):
    """`euclidean_distance` as a layer, so the saved model needs no Python `Lambda`."""

    def call(self, vects):
        return euclidean_distance(vects)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], 1)


def create_siamese_network(input_shape, network="mlp"):
    """Two inputs, one shared base network, their Euclidean distance as output.

    Returns `(model, base_network)`.
    """
    if network == "mlp":
        base_network = create_base_network(input_shape)
    elif network == "conv":
        base_network = create_conv_base_network(input_shape)
    else:
        raise ValueError(f"network must be 'mlp' or 'conv', got {network!r}")
    input_a = keras.Input(shape=input_shape, name="image_a")
    input_b = keras.Input(shape=input_shape, name="image_b")
    # Because the same instance is called twice, the two branches share its weights.
    processed_a = base_network(input_a)
    processed_b = base_network(input_b)
    distance = EuclideanDistance(name="distance")([processed_a, processed_b])
    model = keras.Model([input_a, input_b], distance, name="siamese_network")
    return model, base_network


# ---------------------------------------------------------------------------
# Loss and accuracy
# ---------------------------------------------------------------------------


def contrastive_loss(y_true, y_pred, margin=margin):
    """Contrastive loss of Hadsell et al. 2006, in the Keras example's convention.

    mean(y * d^2 + (1 - y) * max(margin - d, 0)^2), with y = 1 for a pair of the same
    digit and d the predicted distance.
    """
    return ops.mean(contrastive_loss_per_pair(y_true, y_pred, margin))


def contrastive_loss_per_pair(y_true, y_pred, margin=margin):
    """The terms `contrastive_loss` averages, one per pair, in the shape of `y_pred`."""
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.reshape(ops.cast(y_true, y_pred.dtype), ops.shape(y_pred))
    square_pred = ops.square(y_pred)
    margin_square = ops.square(ops.maximum(margin - y_pred, 0.0))
    return y_true * square_pred + (1.0 - y_true) * margin_square


@keras.saving.register_keras_serializable(package="mnist_siamese")
class ContrastiveLoss(keras.losses.Loss):
    """`contrastive_loss` with its margin stored, so a saved model can be reloaded.

    It hands Keras the per-pair terms and lets Keras average them, which keeps the mean
    right when a batch is split across several devices.
    """

    def __init__(self, margin=margin, name="contrastive_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.margin = margin

    def call(self, y_true, y_pred):
        return contrastive_loss_per_pair(y_true, y_pred, self.margin)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}


def compute_accuracy(y_true, y_pred, threshold=distance_threshold):
    """Fraction of pairs classified right by thresholding their distances (NumPy)."""
    pred = np.ravel(y_pred) < threshold
    return float(np.mean(pred == np.ravel(y_true)))


@keras.saving.register_keras_serializable(package="mnist_siamese")
def accuracy(y_true, y_pred):
    """Training-time accuracy metric with the same threshold (keras.ops).

    Returns 1 or 0 per pair; Keras averages them over all pairs seen, so a short last
    batch weighs no more than its pairs.
    """
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.reshape(ops.cast(y_true, y_pred.dtype), ops.shape(y_pred))
    predicted_same = ops.cast(y_pred < distance_threshold, y_pred.dtype)
    return ops.cast(ops.equal(y_true, predicted_same), "float32")


# ---------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------


def prepare_pairs(x_train, y_train, x_test, y_test, seed):
    """Training and test pairs, as in the example (test pairs validate training)."""
    rng = np.random.default_rng(seed)
    digit_indices = [np.where(y_train == i)[0] for i in range(num_classes)]
    tr_pairs, tr_y = create_pairs(x_train, digit_indices, rng)
    digit_indices = [np.where(y_test == i)[0] for i in range(num_classes)]
    te_pairs, te_y = create_pairs(x_test, digit_indices, rng)
    return (tr_pairs, tr_y), (te_pairs, te_y)


def train(model, train_dataset, test_dataset, settings, callbacks=()):
    """Compile with RMSprop and the contrastive loss and fit, validating on test pairs."""
    model.compile(
        loss=ContrastiveLoss(margin=settings.margin),
        optimizer=keras.optimizers.RMSprop(learning_rate=settings.learning_rate),
        metrics=[accuracy],
        # Keras's multi-step loop fails under MirroredStrategy in TF 2.21 (an unfed
        # placeholder in its while loop), so distributed runs take one step per call.
        steps_per_execution=1 if tf.distribute.has_strategy() else steps_per_execution,
        # XLA was measured here: its compile time (2-4 s) outweighed what it saved.
        jit_compile=False,
    )
    return model.fit(
        train_dataset,
        epochs=settings.epochs,
        validation_data=test_dataset,
        callbacks=list(callbacks),
        shuffle=False,  # the dataset reshuffles itself every epoch
        verbose=2,
    )


def predict_distances(base_network, images, pairs):
    """The distance the Siamese model gives each index pair of `images`, as a 1-D array.

    The original runs the whole model on every pair. Here each image is embedded once by
    the shared base network and the pairs' distances are taken between those embeddings:
    the same function of the same weights, with a third of the work on MNIST, where an
    image appears in about four pairs, and without holding batches of pair images.
    """
    # The network is called on slices of the images (dropout off) rather than through
    # `predict`, whose prediction function took 0.3 s to trace for these two calls a run.
    slice_size = evaluation_batch_size * 4
    embeddings = np.concatenate(
        [
            ops.convert_to_numpy(
                base_network(ops.cast(images[start : start + slice_size], "float32") / 255.0)
            )
            for start in range(0, len(images), slice_size)
        ]
    )
    # A slice of pairs at a time keeps the gathered embeddings small (memory).
    distances = []
    for start in range(0, len(pairs), evaluation_batch_size * 16):
        chunk = pairs[start : start + evaluation_batch_size * 16]
        vects = [embeddings[chunk[:, 0]], embeddings[chunk[:, 1]]]
        distances.append(ops.convert_to_numpy(euclidean_distance(vects)).ravel())
    return np.concatenate(distances)


# ---------------------------------------------------------------------------
# What this port adds: evaluation
# ---------------------------------------------------------------------------


def roc_auc(labels, distances):
    """Area under the ROC curve of "same digit" scored by a small distance.

    The probability that a random positive pair is closer than a random negative pair,
    ties counting half (the Mann-Whitney statistic).
    """
    labels = np.asarray(labels).ravel().astype(bool)
    scores = -np.asarray(distances, np.float64).ravel()
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        raise ValueError("roc_auc needs both positive and negative pairs")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # Average rank (1-based) over each run of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    run_ranks = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(run_ranks, ends - starts)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def best_threshold(labels, distances):
    """The distance threshold that classifies `labels` best, and its accuracy.

    Candidates are the midpoints between consecutive sorted distances (and both ends);
    a pair is called "same digit" when its distance is below the threshold.
    """
    labels = np.asarray(labels).ravel().astype(bool)
    distances = np.asarray(distances, np.float64).ravel()
    order = np.argsort(distances, kind="mergesort")
    sorted_distances, sorted_labels = distances[order], labels[order]
    # With the threshold just above the k-th smallest distance, the first k pairs are
    # called positive: right for the positives among them and the negatives after them.
    positives_below = np.concatenate([[0], np.cumsum(sorted_labels)])
    negatives_above = (~sorted_labels).sum() - np.concatenate([[0], np.cumsum(~sorted_labels)])
    correct = positives_below + negatives_above
    # Only cut between distinct distances.
    valid = np.concatenate([[True], np.diff(sorted_distances) > 0, [True]])
    correct = np.where(valid, correct, -1)
    k = int(np.argmax(correct))
    if k == 0:
        threshold = sorted_distances[0] - 1e-6
    elif k == len(sorted_distances):
        threshold = sorted_distances[-1] + 1e-6
    else:
        threshold = (sorted_distances[k - 1] + sorted_distances[k]) / 2
    return float(threshold), float(correct[k] / len(labels))


# ---------------------------------------------------------------------------
# What this port adds: plots
# ---------------------------------------------------------------------------


def plot_training_curves(history_rows, path):
    """Loss and accuracy per epoch, training vs test pairs."""
    pyplot = _pyplot()
    epoch_numbers = [int(row["epoch"]) + 1 for row in history_rows]
    figure, axes = pyplot.subplots(1, 2, figsize=(10, 4))
    for axis, name in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix, label in (("", "training pairs"), ("val_", "test pairs")):
            values = [float(row[prefix + name]) for row in history_rows]
            axis.plot(epoch_numbers, values, marker="o", label=label)
        axis.set_xlabel("epoch")
        axis.set_title(name)
        axis.legend()
    figure.tight_layout()
    _save_figure(figure, path)


def plot_distance_histogram(labels, distances, threshold, path):
    """Histogram of test-pair distances, same vs different digits, with thresholds."""
    pyplot = _pyplot()
    labels = np.asarray(labels).astype(bool)
    figure, axis = pyplot.subplots(figsize=(7, 4))
    bins = np.linspace(0, max(float(np.max(distances)), 1.0), 60)
    axis.hist(distances[labels], bins=bins, alpha=0.6, label="same digit")
    axis.hist(distances[~labels], bins=bins, alpha=0.6, label="different digits")
    axis.axvline(distance_threshold, color="black", label="threshold 0.5")
    axis.axvline(threshold, color="red", linestyle="--", label=f"best threshold {threshold:.3f}")
    axis.set_xlabel("predicted distance")
    axis.set_ylabel("test pairs")
    axis.legend()
    figure.tight_layout()
    _save_figure(figure, path)


def plot_pair_grid(images, pairs, labels, distances, path, count=16):
    """A grid of test pairs spread over all digits, titled with distance and truth.

    A pair the 0.5 threshold gets wrong has a red title.
    """
    pyplot = _pyplot()
    shown = np.unique(np.linspace(0, len(pairs) - 1, min(count, len(pairs))).astype(int))
    # Pairs alternate positive, negative: nudge every other pick so both kinds show.
    shown = np.unique(np.clip(shown - (shown % 2) + np.arange(len(shown)) % 2, 0, len(pairs) - 1))
    columns = 4
    rows = -(-len(shown) // columns)
    figure, axes = pyplot.subplots(
        rows, columns, figsize=(2.6 * columns, 1.6 * rows), squeeze=False
    )
    for axis in axes.ravel():
        axis.axis("off")
    for axis, index in zip(axes.ravel(), shown, strict=False):
        first, second = pairs[index]
        axis.imshow(np.hstack([images[first], images[second]]), cmap="gray")
        truth = "same" if labels[index] else "different"
        wrong = (distances[index] < distance_threshold) != bool(labels[index])
        # Text placed above the image rather than set_title, and fixed margins rather than
        # tight_layout: both measure every hidden axis, which took 0.3 s of 0.5 s here.
        axis.text(
            0.5,
            1.04,
            f"d={distances[index]:.2f} ({truth})",
            transform=axis.transAxes,
            horizontalalignment="center",
            fontsize=9,
            color="red" if wrong else "black",
        )
    # 0.3 inch above the first row holds its titles.
    figure_height = figure.get_figheight()
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.3 / figure_height)
    _save_figure(figure, path)


def _pyplot():
    """Matplotlib's pyplot on a file-only backend, imported only when plotting."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _save_figure(figure, path):
    """Save a figure as PNG through a temporary file, then close it."""
    with _atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    _pyplot().close(figure)


# ---------------------------------------------------------------------------
# What this port adds: safe outputs and resumable training
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_path(path):
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
    with _atomic_path(path) as temporary:
        pathlib.Path(temporary).write_text(json.dumps(data, indent=2) + "\n")


def save_model(model, path):
    """Save a Keras model as a `.keras` file, atomically."""
    with _atomic_path(path) as temporary:
        model.save(temporary)


def prepare_output_dir(output_dir, resume, overwrite, dry_run):
    """Create the output folder and decide whether a run may start in it.

    A folder that holds a finished run (its `metrics.json`) is kept unless `overwrite`
    (a dry run may replace an earlier dry run's output). A folder with an interrupted
    run's backup continues it with `resume`, starts over with `overwrite`, and is
    refused otherwise.
    """
    output_dir = pathlib.Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file, not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=output_dir)
        probe.close()
    except OSError as error:
        raise ValueError(
            f"--output-dir {output_dir} cannot be written ({error.strerror or error})"
        ) from None
    metrics_path = output_dir / "metrics.json"
    backup_dir = output_dir / "backup"
    if metrics_path.exists() and not overwrite:
        if not (dry_run and _is_dry_run_output(metrics_path)):
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
        metrics_path.unlink(missing_ok=True)
        shutil.rmtree(backup_dir, ignore_errors=True)
    # Rows logged by a run that left no backup belong to no run that can be resumed.
    if not backup_dir.exists():
        (output_dir / "history-progress.csv").unlink(missing_ok=True)
    return output_dir


def _is_dry_run_output(metrics_path):
    """Whether a `metrics.json` was written by a dry run."""
    try:
        return bool(json.loads(metrics_path.read_text()).get("dry_run"))
    except (OSError, ValueError):
        return False


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch (training and validation) run in this process."""

    def on_train_begin(self, logs=None):
        self.durations = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.durations.append(time.perf_counter() - self._start)


def training_callbacks(output_dir):
    """The per-epoch log row, then a backup of the training state, every epoch.

    The row comes first: if a run dies between the two, the resumed run repeats that
    epoch and logs it again, and `final_history` keeps the later row. (The other order
    would lose the row of an epoch that the backup already counts as done.)
    """
    return [
        keras.callbacks.CSVLogger(str(output_dir / "history-progress.csv"), append=True),
        keras.callbacks.BackupAndRestore(
            backup_dir=str(output_dir / "backup"), double_checkpoint=True
        ),
        EpochTimer(),
    ]


def final_history(output_dir):
    """The per-epoch rows logged across interruptions, one per epoch, in order."""
    with open(output_dir / "history-progress.csv", newline="") as stream:
        rows = {int(row["epoch"]): row for row in csv.DictReader(stream)}
    return [rows[epoch] for epoch in sorted(rows)]


def write_history(rows, path):
    """Write the per-epoch rows as `history.csv`, atomically."""
    with _atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


# ---------------------------------------------------------------------------
# What this port adds: devices and command line
# ---------------------------------------------------------------------------


def choose_strategy(name):
    """The `tf.distribute` strategy for `--distribute` and a line describing it.

    `auto` mirrors over the GPUs when more than one is visible. `mirrored` without GPUs
    mirrors over the logical CPU devices (useful for testing the distributed path).
    """
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "none"
    device = f"GPU ({len(gpus)} visible)" if gpus else "CPU"
    if name == "none":
        return tf.distribute.get_strategy(), f"Device: {device}"
    devices = gpus or tf.config.list_logical_devices("CPU")
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
    replicas = strategy.num_replicas_in_sync
    return strategy, f"Device: {device}, MirroredStrategy over {replicas} replicas"


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
    if requested is None:
        gpus = tf.config.list_physical_devices("GPU")
        requested = 1 if network == "mlp" and not gpus else 0
    try:
        tf.config.threading.set_intra_op_parallelism_threads(requested)
    except RuntimeError:
        pass  # TensorFlow has started in this process: its setting stays.
    return tf.config.threading.get_intra_op_parallelism_threads()


class _ArgumentParser(argparse.ArgumentParser):
    """An argument parser that reports a mistake in one line and exits with code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text):
    return _whole_number(text, minimum=1)


def _thread_count(text):
    return _whole_number(text, minimum=0)


def _whole_number(text, minimum):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        kind = "a positive number" if minimum == 1 else f"at least {minimum}"
        raise argparse.ArgumentTypeError(f"must be {kind}, got {value}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_argument_parser():
    """The command line; every default is the original example's."""
    parser = _ArgumentParser(
        prog="mnist_siamese.py",
        description="Train a Siamese network with a contrastive loss on MNIST pairs.",
    )
    parser.add_argument("--epochs", type=_positive_int, default=epochs, help="epochs (default 20)")
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        help="pairs per batch (default 128; 32 with --dry-run, so that its one short "
        "epoch takes enough steps to learn)",
    )
    parser.add_argument(
        "--margin",
        type=_positive_float,
        default=margin,
        help="contrastive-loss margin: distance beyond which different digits cost "
        "nothing (default 1.0)",
    )
    parser.add_argument(
        "--learning-rate",
        type=_positive_float,
        default=learning_rate,
        help="RMSprop learning rate (default 0.001)",
    )
    parser.add_argument(
        "--network",
        choices=("mlp", "conv"),
        default="mlp",
        help="embedding network: the example's MLP, or a small convnet (default mlp)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=42,
        help="seed for pairs, weights, dropout and shuffling (default 42)",
    )
    parser.add_argument(
        "--data",
        type=pathlib.Path,
        help="a mnist.npz-style file or a folder of the four official "
        "*-idx?-ubyte.gz files (default: download MNIST through Keras)",
    )
    parser.add_argument(
        "--limit",
        type=_positive_int,
        help="use only the first N training and the first N test images",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="quick check: 1 epoch on the small MNIST subset shipped in data/ "
        "(5,000 training and 1,000 test digits), output in runs/mnist_siamese_dry_run "
        "unless --output-dir is given",
    )
    parser.add_argument(
        "--output-dir",
        type=pathlib.Path,
        help="where models, history, metrics and plots go (default runs/mnist_siamese)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --output-dir from its last finished epoch",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished or interrupted run in --output-dir",
    )
    parser.add_argument(
        "--distribute",
        choices=("auto", "none", "mirrored"),
        default="auto",
        help="auto: MirroredStrategy when several GPUs are visible (default auto)",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=_thread_count,
        help="threads TensorFlow gives one operation; 0 lets TensorFlow choose (default: "
        "1 for the MLP without a GPU, where it measured faster, otherwise 0)",
    )
    return parser


def limit_images(images, labels, limit, split):
    """The first `limit` images of a split; every class must keep two images."""
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    counts = np.bincount(labels, minlength=num_classes)
    scarce = [digit for digit in range(num_classes) if counts[digit] < 2]
    if scarce:
        hint = " (raise --limit)" if limit is not None else ""
        raise ValueError(
            f"the {split} images hold fewer than two images of digit(s) "
            f"{', '.join(map(str, scarce))}; every digit needs two to make pairs{hint}"
        )
    return images, labels


def run(args):
    """Train, evaluate and save according to parsed command-line arguments."""
    if args.dry_run:
        args.epochs = 1
        args.data = args.data or DRY_RUN_DATA
    args.batch_size = args.batch_size or (dry_run_batch_size if args.dry_run else batch_size)
    output_dir = args.output_dir or (DRY_RUN_OUTPUT_DIR if args.dry_run else DEFAULT_OUTPUT_DIR)

    intra_op_threads = configure_threads(args.intra_op_threads, args.network)
    strategy, device_line = choose_strategy(args.distribute)
    print(device_line, flush=True)
    keras.utils.set_random_seed(args.seed)

    (x_train, y_train), (x_test, y_test) = load_mnist(args.data)
    x_train, y_train = limit_images(x_train, y_train, args.limit, "training")
    x_test, y_test = limit_images(x_test, y_test, args.limit, "test")
    (tr_pairs, tr_y), (te_pairs, te_y) = prepare_pairs(x_train, y_train, x_test, y_test, args.seed)
    print(
        f"{len(tr_pairs)} training pairs from {len(x_train)} images, "
        f"{len(te_pairs)} test pairs from {len(x_test)} images",
        flush=True,
    )
    output_dir = prepare_output_dir(output_dir, args.resume, args.overwrite, args.dry_run)

    input_shape = x_train.shape[1:]
    with strategy.scope():
        model, base_network = create_siamese_network(input_shape, args.network)
    # One tensor of the training images serves training and evaluation; the NumPy copy
    # is dropped so that the images are held once (memory).
    train_images = tf.convert_to_tensor(x_train)
    del x_train
    train_dataset = make_pair_dataset(train_images, tr_pairs, tr_y, args.batch_size, args.seed)
    # Validation batches are larger: the size does not change what validation measures, and
    # a pass over the test pairs took 0.09 s in batches of 1,024 against 0.12 s in 128s.
    test_dataset = make_pair_dataset(x_test, te_pairs, te_y, evaluation_batch_size)
    callbacks = training_callbacks(output_dir)
    try:
        with strategy.scope():
            train(model, train_dataset, test_dataset, args, callbacks)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"interrupted: finished epochs are backed up in {output_dir / 'backup'}; "
            "run the same command with --resume to continue"
        ) from None
    timer = callbacks[-1]

    # Compute final accuracy on training and test sets (dropout off).
    tr_distances = predict_distances(base_network, train_images, tr_pairs)
    te_distances = predict_distances(base_network, x_test, te_pairs)
    tr_acc = compute_accuracy(tr_y, tr_distances)
    te_acc = compute_accuracy(te_y, te_distances)
    # The threshold is chosen on training pairs, so the test figure stays unbiased.
    threshold, _ = best_threshold(tr_y, tr_distances)
    history_rows = final_history(output_dir)
    metrics = {
        "train_accuracy": tr_acc,
        "test_accuracy": te_acc,
        "test_roc_auc": roc_auc(te_y, te_distances),
        "best_threshold": threshold,
        "best_threshold_accuracy": compute_accuracy(te_y, te_distances, threshold),
        "epochs": len(history_rows),
        "seconds_per_epoch": float(np.mean(timer.durations)) if timer.durations else None,
        "network": args.network,
        "intra_op_threads": intra_op_threads,
        "margin": args.margin,
        "seed": args.seed,
        "training_pairs": len(tr_pairs),
        "test_pairs": len(te_pairs),
        "dry_run": bool(args.dry_run),
    }

    save_model(model, output_dir / "siamese_model.keras")
    save_model(base_network, output_dir / "embedding_network.keras")
    write_history(history_rows, output_dir / "history.csv")
    if not args.no_plots:
        plot_training_curves(history_rows, output_dir / "training_curves.png")
        plot_distance_histogram(
            te_y, te_distances, threshold, output_dir / "distance_histogram.png"
        )
        plot_pair_grid(x_test, te_pairs, te_y, te_distances, output_dir / "pairs.png")
    # metrics.json marks the run as finished, so it is written last.
    write_json(metrics, output_dir / "metrics.json")
    (output_dir / "history-progress.csv").unlink(missing_ok=True)
    print(f"Saved models, history, metrics and plots in {output_dir}")

    print(f"* Accuracy on training set: {100 * tr_acc:0.2f}%")
    print(f"* Accuracy on test set: {100 * te_acc:0.2f}%")
    return metrics


def main(argv=None):
    """Command-line entry point; returns the process exit code."""
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt as interrupt:
        message = str(interrupt) or "interrupted"
        print(f"{parser.prog}: {message}", file=sys.stderr)
        return 130
    except (ValueError, OSError, DownloadError) as error:
        print(f"{parser.prog}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
