"""Image similarity with a Siamese network and a triplet loss, on Totally Looks Like (Keras 3).

A port of the keras.io example "Image similarity estimation using a Siamese Network with a
triplet loss" (2021). Three copies of one embedding network (a ResNet50 pretrained on
ImageNet, frozen up to `conv5_block1_out`, with a small dense head) read an anchor image, a
positive image that people judged to look like it, and a negative image from another pair.
The FaceNet triplet loss max(|f(A) - f(P)|^2 - |f(A) - f(N)|^2 + margin, 0) pulls the
positive closer to the anchor than the negative. The data is the Totally Looks Like dataset
(Rosenfeld, Solbach & Tsotsos 2018): 6,016 pairs of images in two folders, `left/` and
`right/`, whose sorted file names match pair by pair. The example reports val_loss 0.2841
after 10 epochs.

The sections follow the example: setup, load the dataset, prepare the data, set up the
embedding generator model, set up the Siamese network, putting everything together,
inspecting what the network has learned. What this port adds (decoding each image once and
caching the frozen trunk's features, synthetic data, plots, safe outputs, command line) comes
after them.

    python triplet_totally_looks_like.py                     # the example: download, 10 epochs
    python triplet_totally_looks_like.py --data-dir DIR      # DIR holds left/ and right/
    python triplet_totally_looks_like.py --weights none      # no ImageNet weights (offline)
    python triplet_totally_looks_like.py --dry-run           # tiny generated data, 1 epoch
"""

import argparse
import contextlib
import csv
import json
import os
import pathlib
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import warnings
import zipfile

import numpy as np

# TensorFlow prints start-up notices (oneDNN, CUDA probes) to the stderr file descriptor,
# some of them before Python's logging is set up, so they are silenced at that level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def _stderr_silenced():
    """Send whatever is written to file descriptor 2 to /dev/null inside the block."""
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
    from keras.applications import resnet

    # Listing the GPUs loads the CUDA libraries, which log too.
    tf.config.list_physical_devices("GPU")

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

# Defaults of the example.
target_shape = (200, 200)
batch_size = 32
epochs = 10
margin = 0.5
learning_rate = 0.0001
validation_split = 0.2
# The example seeds only its file shuffles; this port seeds everything, for reproducibility.
seed = 42

# ResNet50 without its top accepts images of at least 32 x 32 pixels.
minimum_image_size = 32
# The layer from which the example trains ResNet50; everything before it stays frozen.
first_trainable_layer = "conv5_block1_out"

# `--dry-run`: generated pairs, small images, one epoch, no pretrained weights.
dry_run_pairs = 48
dry_run_image_size = 64
dry_run_epochs = 1
# How much the two generated images of a pair differ: enough that a randomly initialised
# network does not already match them all (measured: see the README).
synthetic_jitter = 2.0

# The example's two Google Drive files, unpacked into ~/.keras/left and ~/.keras/right.
google_drive_ids = {
    "left": "1jvkbTr_giSP3Ru8OwGNCg6B4PvVbcO34",
    "right": "1EzBZUb_mh_Dp_FKD0P4XiYYSd0QBH5zW",
}
cache_dir = pathlib.Path.home() / ".keras"

DEFAULT_OUTPUT_DIR = pathlib.Path("runs") / "triplet_totally_looks_like"
DRY_RUN_OUTPUT_DIR = pathlib.Path("runs") / "triplet_totally_looks_like_dry_run"
# Every file a run writes in its output folder (`--overwrite` removes only these).
OUTPUT_FILES = (
    "metrics.json",
    "embedding.keras",
    "history.csv",
    "history-progress.csv",
    "split.json",
    "settings.json",
    "similarities.csv",
    "triplets.png",
    "loss.png",
    "distances.png",
    "retrieval.png",
)


class DownloadError(RuntimeError):
    """A download failed: no network, or the server did not deliver the file."""


def _one_line(error):
    """The first line of an exception's message (or its type when the message is empty)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------
# Load the dataset
# ---------------------------------------------------------------------------


def download_dataset(destination=None):
    """Download and unpack the Totally Looks Like images once; return their folder.

    The example fetches `left.zip` and `right.zip` from Google Drive with `gdown` and
    unzips them into `~/.keras`. Here each zip is downloaded to a temporary name and
    renamed when complete, checked, and unpacked member by member into a temporary folder
    that is renamed into place at the end, so an interrupted download or extraction is
    never mistaken for a finished one. Folders already present are used as they are.
    """
    destination = pathlib.Path(destination or cache_dir)
    destination.mkdir(parents=True, exist_ok=True)
    for side, file_id in google_drive_ids.items():
        folder = destination / side
        if folder.is_dir():
            continue
        zip_path = destination / f"{side}.zip"
        if not zip_path.is_file():
            download_from_google_drive(file_id, zip_path)
        extract_zip_safely(zip_path, folder)
    return destination


def download_from_google_drive(file_id, path):
    """Fetch one Google Drive file with `gdown`, to a temporary name renamed when complete."""
    path = pathlib.Path(path)
    offline_hint = (
        "without a network, pass --data-dir DIR (a folder holding left/ and right/) "
        "or try --dry-run"
    )
    try:
        import gdown
    except ImportError:
        raise DownloadError(
            f"downloading {path.name} needs the gdown package (pip install gdown); {offline_hint}"
        ) from None
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(handle)
    try:
        try:
            result = gdown.download(id=file_id, output=temporary, quiet=False)
        except Exception as error:  # gdown raises its own classes and requests' errors
            raise DownloadError(
                f"could not download {path.name} from Google Drive ({_one_line(error)}); "
                f"{offline_hint}"
            ) from None
        if result is None or os.path.getsize(temporary) == 0:
            raise DownloadError(f"could not download {path.name} from Google Drive; {offline_hint}")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def _member_parts(member):
    """The components of a zip member's path, with either kind of slash."""
    return [part for part in member.filename.replace("\\", "/").split("/") if part not in ("", ".")]


def _unsafe_member_reason(member):
    """Why a zip member must not be extracted, or None when it is a plain file or folder."""
    name = member.filename.replace("\\", "/")
    parts = _member_parts(member)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in parts:
        return "'..' in its path"
    if not parts:
        return "empty name"
    file_type = stat.S_IFMT(member.external_attr >> 16)
    if file_type == stat.S_IFLNK:
        return "symbolic link"
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "special file"
    return None


def extract_zip_safely(zip_path, folder):
    """Unpack `zip_path` into `folder` (for `left.zip`, the `left/` inside it).

    The archive is checked first (`ZipFile.testzip`, then every member's path), and
    nothing is written if a member is a link, an absolute path or climbs out with `..`.
    Members are written one by one into a temporary folder beside `folder`, which is
    renamed into place only when all are out.
    """
    zip_path, folder = pathlib.Path(zip_path), pathlib.Path(folder)
    redownload = f"delete {zip_path} and run again to download it afresh"
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise ValueError(f"{zip_path} is not a valid zip file; {redownload}") from None
    with archive:
        try:
            corrupt_member = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise ValueError(f"{zip_path} is damaged ({_one_line(error)}); {redownload}") from None
        if corrupt_member is not None:
            raise ValueError(f"{zip_path}: member {corrupt_member} is corrupt; {redownload}")
        members = archive.infolist()
        for member in members:
            reason = _unsafe_member_reason(member)
            if reason:
                raise ValueError(
                    f"{zip_path}: refusing to extract member {member.filename!r} ({reason}); "
                    "the archive is not the expected dataset"
                )
        temporary = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
        try:
            for member in members:
                target = temporary.joinpath(*_member_parts(member))
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(target, "xb") as sink:
                    shutil.copyfileobj(source, sink)
            # The example's zips hold a top folder named like the zip; use it when present.
            root = temporary / folder.name
            os.rename(root if root.is_dir() else temporary, folder)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    return folder


def find_image_pairs(data_dir):
    """The sorted image paths of `data_dir/left` (anchors) and `data_dir/right` (positives).

    The two folders must hold the same number of files, and their sorted names must match
    pair by pair (the extension may differ). Hidden files are ignored.
    """
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(
            f"--data-dir {data_dir}: no such folder (it must hold left/ and right/, the "
            "Totally Looks Like layout)"
        )
    folders = {}
    for side in ("left", "right"):
        folder = data_dir / side
        if not folder.is_dir():
            raise ValueError(
                f"--data-dir {data_dir} has no {side}/ folder; it must hold left/ and "
                "right/ with one image of each pair in each"
            )
        files = sorted(
            (path for path in folder.iterdir() if path.is_file() and not path.name.startswith(".")),
            key=lambda path: path.name,
        )
        if not files:
            raise ValueError(f"{folder} holds no images")
        folders[side] = files
    anchor_images, positive_images = folders["left"], folders["right"]
    if len(anchor_images) != len(positive_images):
        raise ValueError(
            f"{data_dir}: left/ holds {len(anchor_images)} files and right/ holds "
            f"{len(positive_images)}; every image in left/ needs its partner of the same "
            "name in right/"
        )
    for number, (anchor, positive) in enumerate(
        zip(anchor_images, positive_images, strict=True), 1
    ):
        if anchor.stem != positive.stem:
            raise ValueError(
                f"{data_dir}: file names do not pair up: left/{anchor.name} and "
                f"right/{positive.name} are both number {number} after sorting; the two "
                "images of a pair must share a name"
            )
    return [str(path) for path in anchor_images], [str(path) for path in positive_images]


# ---------------------------------------------------------------------------
# Prepare the data
# ---------------------------------------------------------------------------


def decode_image(image_string):
    """Decode JPEG, PNG, GIF or BMP bytes to a uint8 RGB image, whatever the file's name.

    The example's `decode_jpeg` fails on PNG or GIF content behind a `.jpg` name. Grayscale
    and palette images get three channels, CMYK JPEGs are converted to RGB by the decoder,
    16-bit PNGs are scaled to 0-255 (`dtype=uint8`), an animated GIF gives its first frame.
    EXIF orientation tags are ignored, as in the example: a rotated photo stays rotated.
    """
    return tf.io.decode_image(image_string, channels=3, dtype=tf.uint8, expand_animations=False)


def preprocess_image(filename, image_size=target_shape):
    """Load an image file as float32 pixel values 0-255, resized to `image_size`.

    The example scales to [0, 1] before `resnet.preprocess_input`, which expects 0-255
    (it subtracts the ImageNet channel means in that scale): the pretrained weights then
    see almost constant images. The values stay 0-255 here.
    """
    image_string = tf.io.read_file(filename)
    image = decode_image(image_string)
    image = tf.cast(image, tf.float32)
    image = tf.image.resize(image, image_size)
    return image


def preprocess_triplets(anchor, positive, negative, image_size=target_shape):
    """Load the three image files of a triplet."""
    return (
        preprocess_image(anchor, image_size),
        preprocess_image(positive, image_size),
        preprocess_image(negative, image_size),
    )


def _decode_error_reason(error):
    """TensorFlow's decoding error message without its graph-node prefix and op suffix."""
    message = getattr(error, "message", None) or str(error)
    message = re.sub(r"\{\{[^}]*\}\}\s*", "", message)
    message = re.sub(r"\s*\[Op:\w+\].*$", "", message, flags=re.S)
    return _one_line(message.strip() or type(error).__name__)


def find_unreadable_images(filenames):
    """The files among `filenames` that `preprocess_image`'s decoder cannot read.

    Returns `{filename: reason}`. All files are decoded once, in parallel, with the same
    decoder as the training pipeline, so a corrupt or truncated file is found before
    training starts instead of stopping it midway.
    """
    filenames = list(filenames)
    if not filenames:
        return {}
    dataset = tf.data.Dataset.from_tensor_slices(
        (np.arange(len(filenames), dtype=np.int64), filenames)
    )
    dataset = dataset.map(
        lambda index, filename: (index, tf.shape(decode_image(tf.io.read_file(filename)))),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    # The JPEG library prints its own complaints about bad files to stderr; they are
    # replaced by one warning per file from the caller.
    with _stderr_silenced():
        readable = {int(index) for index, _ in dataset.ignore_errors().as_numpy_iterator()}
        unreadable = {}
        for index, filename in enumerate(filenames):
            if index in readable:
                continue
            try:
                decode_image(tf.io.read_file(filename))
                unreadable[filename] = "could not be decoded"
            except (tf.errors.OpError, OSError) as error:
                unreadable[filename] = _decode_error_reason(error)
    return unreadable


def drop_unreadable_pairs(anchor_images, positive_images):
    """Skip every pair with an unreadable image, with a warning naming the file.

    Returns `(anchor_images, positive_images, skipped_anchor_names)`.
    """
    unreadable = find_unreadable_images(list(anchor_images) + list(positive_images))
    kept_anchors, kept_positives, skipped = [], [], []
    for anchor, positive in zip(anchor_images, positive_images, strict=True):
        bad = [name for name in (anchor, positive) if name in unreadable]
        if not bad:
            kept_anchors.append(anchor)
            kept_positives.append(positive)
            continue
        skipped.append(os.path.basename(anchor))
        for name in bad:
            print(
                f"warning: skipping the pair of {os.path.basename(anchor)}: {name} is not a "
                f"readable image ({unreadable[name]})",
                file=sys.stderr,
            )
    return kept_anchors, kept_positives, skipped


def split_pairs(pair_count, validation_split=validation_split, seed=seed):
    """Indices of the training and the validation pairs, each sorted.

    The example shuffles the triplets with a reshuffle on every iteration and then splits
    them with `take`/`skip`, so every epoch validates on different pairs, most of which it
    trained on before. Here the pairs are split once, by a seeded permutation, before
    anything is shuffled. Each side needs two pairs, since a negative comes from another
    pair of the same side.
    """
    train_count = round(pair_count * (1 - validation_split))
    if train_count < 2 or pair_count - train_count < 2:
        raise ValueError(
            f"{pair_count} pairs split {validation_split:g} for validation leave "
            f"{train_count} training and {pair_count - train_count} validation pairs; each "
            "side needs at least 2 (use more pairs, or change --limit or --validation-split)"
        )
    order = np.random.default_rng(seed).permutation(pair_count)
    return np.sort(order[:train_count]), np.sort(order[train_count:])


def choose_negatives(pair_count, rng):
    """For pair i, the index of a negative image in `anchors + positives`, never of pair i.

    The example draws negatives from all images, so a negative can be the anchor itself or
    its own positive, which teaches the model the opposite of the truth. Indices below
    `pair_count` are anchors, the others positives; each other image is equally likely.
    """
    if pair_count < 2:
        raise ValueError("choose_negatives needs at least two pairs")
    rng = np.random.default_rng(rng)
    other_pair = rng.integers(0, pair_count - 1, size=pair_count)
    # Shift the draws at or above i by one: pair i itself is never chosen.
    other_pair += other_pair >= np.arange(pair_count)
    side = rng.integers(0, 2, size=pair_count)
    return other_pair + side * pair_count


def training_triplet_indices(pair_count, seed=seed):
    """A `tf.data` dataset of (anchor, positive, negative) indices into `anchors + positives`.

    Pair i is (i, pair_count + i). The pairs are reshuffled every epoch and every anchor
    gets a new negative every epoch, by the rule of `choose_negatives`.
    """
    if pair_count < 2:
        raise ValueError("training needs at least two pairs")
    pairs = tf.data.Dataset.range(pair_count)
    pairs = pairs.shuffle(pair_count, seed=seed, reshuffle_each_iteration=True)
    random_numbers = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

    def add_negative(index, random_number):
        # The same rule as `choose_negatives`, from one random integer per triplet.
        other_pair = tf.math.floormod(random_number // 2, pair_count - 1)
        other_pair += tf.cast(other_pair >= index, tf.int64)
        side = tf.math.floormod(random_number, 2)
        return index, index + pair_count, other_pair + side * pair_count

    dataset = tf.data.Dataset.zip(pairs, random_numbers)
    return dataset.map(add_negative, num_parallel_calls=tf.data.AUTOTUNE)


def training_triplets(anchor_images, positive_images, seed=seed):
    """A `tf.data` dataset of (anchor, positive, negative) file names for training.

    The pairs are reshuffled every epoch and every anchor gets a new negative every epoch,
    drawn from the other training pairs only (validation images never appear here).
    """
    if len(anchor_images) != len(positive_images):
        raise ValueError("training_triplets needs as many anchors as positives")
    pool = tf.constant(list(anchor_images) + list(positive_images))
    return training_triplet_indices(len(anchor_images), seed).map(
        lambda anchor, positive, negative: (
            tf.gather(pool, anchor),
            tf.gather(pool, positive),
            tf.gather(pool, negative),
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def validation_triplet_indices(negative_indices):
    """A `tf.data` dataset of the fixed validation triplets as indices, in order.

    Pair i is (i, pair_count + i), with the negative `negative_indices[i]` chosen once
    (`choose_negatives`), so every epoch's val_loss is measured on the same triplets and
    can be compared from epoch to epoch.
    """
    negative_indices = np.asarray(negative_indices, np.int64)
    pair_count = len(negative_indices)
    return tf.data.Dataset.from_tensor_slices(
        (np.arange(pair_count), np.arange(pair_count) + pair_count, negative_indices)
    )


def make_dataset(triplet_files, image_size=target_shape, batch_size=batch_size):
    """Decode the triplets' images and batch them, as the example does."""
    dataset = triplet_files.map(
        lambda anchor, positive, negative: preprocess_triplets(
            anchor, positive, negative, image_size
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    dataset = dataset.batch(batch_size, drop_remainder=False)
    return dataset.prefetch(tf.data.AUTOTUNE)


def visualize(anchor, positive, negative, path=None):
    """Draw three triplets in a 3 x 3 grid (anchor, positive, negative per row) as a PNG.

    The images are 0-255 float arrays as `preprocess_image` returns them.
    """
    pyplot = _pyplot()
    figure = pyplot.figure(figsize=(9, 9))
    axes = figure.subplots(3, 3)
    for column, title in enumerate(("anchor", "positive", "negative")):
        axes[0, column].set_title(title)
    for row in range(3):
        for column, images in enumerate((anchor, positive, negative)):
            axis = axes[row, column]
            axis.set_axis_off()
            if row < len(images):
                axis.imshow(np.clip(np.asarray(images[row]) / 255.0, 0.0, 1.0))
    _save_figure(figure, path)


# ---------------------------------------------------------------------------
# Setting up the embedding generator model
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="triplet_totally_looks_like")
class ResNetPreprocessing(layers.Layer):
    """`resnet.preprocess_input` as a layer: 0-255 RGB to ResNet50's BGR, mean-centred.

    A layer instead of a `Lambda`, so the saved embedding model reloads in safe mode.
    """

    def call(self, inputs):
        return resnet.preprocess_input(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape


def load_resnet50(weights="imagenet", input_shape=target_shape + (3,)):
    """ResNet50 without its classification top, with the weights `--weights` names.

    `weights` is "imagenet" (Keras downloads them once, checked against their hash), None
    (random initialisation) or the path of a local `.h5` / `.weights.h5` file of
    `ResNet50(include_top=False)` weights, for offline use.
    """
    if weights == "imagenet":
        try:
            return resnet.ResNet50(weights="imagenet", input_shape=input_shape, include_top=False)
        except Exception as error:  # `get_file` raises a bare Exception when offline
            raise DownloadError(
                f"could not get the ImageNet weights of ResNet50 ({_one_line(error)}); "
                "without a network pass --weights none (random initialisation) or "
                "--weights PATH (a local copy of the weights file)"
            ) from None
    if weights is None:
        return resnet.ResNet50(weights=None, input_shape=input_shape, include_top=False)
    path = pathlib.Path(weights)
    if not path.is_file():
        raise ValueError(
            f"--weights {path}: no such file (give 'imagenet', 'none' or the path of a "
            "ResNet50 .h5 / .weights.h5 weights file)"
        )
    try:
        # A mismatched file makes Keras warn once per layer before it fails; the one
        # error below says it better.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return resnet.ResNet50(weights=str(path), input_shape=input_shape, include_top=False)
    except Exception as error:  # h5py and Keras raise many kinds of error for a bad file
        raise ValueError(
            f"--weights {path}: cannot load it into ResNet50 without its top "
            f"({_one_line(error)}); it must be a .h5 or .weights.h5 file of "
            "ResNet50(include_top=False) weights"
        ) from None


def set_trainable_layers(base_cnn, first_trainable=first_trainable_layer):
    """Freeze every layer of `base_cnn` before `first_trainable`; train it and the rest.

    A frozen BatchNormalization layer also runs in inference mode in Keras 3, so the frozen
    part computes the same features for an image in every epoch.
    """
    names = [layer.name for layer in base_cnn.layers]
    if first_trainable not in names:
        raise ValueError(f"{base_cnn.name} has no layer named {first_trainable}")
    trainable = False
    for layer in base_cnn.layers:
        if layer.name == first_trainable:
            trainable = True
        layer.trainable = trainable


def build_embedding_network(image_size=target_shape, weights="imagenet"):
    """The example's embedding model, named "Embedding", taking 0-255 RGB images.

    ResNet50 (frozen before `conv5_block1_out`) -> Flatten -> Dense(512, relu) ->
    BatchNorm -> Dense(256, relu) -> BatchNorm -> Dense(256). The example applies
    `resnet.preprocess_input` in the Siamese network; here it is the embedding model's
    first layer, so the saved model takes plain images. `split_embedding_network` cuts it
    into the frozen trunk and the trainable tail.
    """
    input_shape = tuple(image_size) + (3,)
    base_cnn = load_resnet50(weights, input_shape)
    set_trainable_layers(base_cnn)

    inputs = keras.Input(shape=input_shape, name="image")
    preprocessed = ResNetPreprocessing(name="resnet_preprocessing")(inputs)
    flatten = layers.Flatten()(base_cnn(preprocessed))
    dense1 = layers.Dense(512, activation="relu")(flatten)
    dense1 = layers.BatchNormalization()(dense1)
    dense2 = layers.Dense(256, activation="relu")(dense1)
    dense2 = layers.BatchNormalization()(dense2)
    # float32 even under mixed precision: the embeddings and their distances stay exact.
    output = layers.Dense(256, dtype="float32")(dense2)
    return keras.Model(inputs, output, name="Embedding")


def split_embedding_network(embedding):
    """`(trunk, tail)` with `tail(trunk(images)) == embedding(images)`.

    The trunk runs from the input to `conv5_block1_out` (all frozen); the tail holds the
    trainable layers. Both share the embedding model's layers and weights.
    """
    base_cnn = embedding.get_layer("resnet50")
    cut = base_cnn.get_layer(first_trainable_layer).output
    trunk_resnet = keras.Model(base_cnn.input, cut, name="resnet50_trunk")
    tail_resnet = keras.Model(cut, base_cnn.output, name="resnet50_tail")

    images = keras.Input(shape=embedding.input.shape[1:], name="image")
    features = trunk_resnet(embedding.get_layer("resnet_preprocessing")(images))
    trunk = keras.Model(images, features, name="EmbeddingTrunk")

    feature_input = keras.Input(shape=features.shape[1:], name="features")
    x = tail_resnet(feature_input)
    head_layers = embedding.layers[embedding.layers.index(base_cnn) + 1 :]
    for layer in head_layers:
        x = layer(x)
    tail = keras.Model(feature_input, x, name="EmbeddingTail")
    return trunk, tail


# ---------------------------------------------------------------------------
# Setting up the Siamese Network model
# ---------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="triplet_totally_looks_like")
class DistanceLayer(layers.Layer):
    """The squared L2 distances anchor-positive and anchor-negative, one per triplet."""

    def call(self, anchor, positive, negative):
        ap_distance = ops.sum(ops.square(anchor - positive), -1)
        an_distance = ops.sum(ops.square(anchor - negative), -1)
        return (ap_distance, an_distance)


def build_siamese_network(embedding):
    """Three inputs, one shared embedding model, the two distances as output.

    The inputs have the shape the embedding model takes: images, or for the tail of
    `split_embedding_network`, the frozen trunk's features.
    """
    input_shape = tuple(embedding.input.shape[1:])
    anchor_input = keras.Input(name="anchor", shape=input_shape)
    positive_input = keras.Input(name="positive", shape=input_shape)
    negative_input = keras.Input(name="negative", shape=input_shape)
    # float32 under mixed precision too (the layer casts its inputs): float16 squares
    # overflow early.
    distances = DistanceLayer(name="distances", dtype="float32")(
        embedding(anchor_input),
        embedding(positive_input),
        embedding(negative_input),
    )
    return keras.Model(
        inputs=[anchor_input, positive_input, negative_input],
        outputs=distances,
        name="siamese_network",
    )


# ---------------------------------------------------------------------------
# Putting everything together
# ---------------------------------------------------------------------------


def triplet_loss(ap_distance, an_distance, margin=margin):
    """Per-triplet loss max(d(A, P) - d(A, N) + margin, 0), with squared L2 distances."""
    return ops.maximum(ap_distance - an_distance + margin, 0.0)


class SiameseModel(keras.Model):
    """The Siamese network with a custom training loop for the triplet loss.

    The example's `_compute_loss` is `_compute_triplet_loss` here: Keras 3 models have a
    method of the example's name that this one would shadow. The loss is the mean over the
    batch (the example differentiates the per-triplet vector, i.e. its sum: with Adam the
    difference is only a constant factor on the gradient).
    """

    def __init__(self, siamese_network, margin=margin, **kwargs):
        super().__init__(**kwargs)
        self.siamese_network = siamese_network
        self.margin = margin
        self.loss_tracker = keras.metrics.Mean(name="loss")
        # Its one layer, the functional network, is built already. BackupAndRestore
        # refuses a model that does not say so.
        self.built = True

    def call(self, inputs, training=False):
        anchor, positive, negative = inputs
        return self.siamese_network([anchor, positive, negative], training=training)

    def train_step(self, data):
        # GradientTape records the forward pass, to differentiate the loss afterwards.
        with tf.GradientTape() as tape:
            loss = self._compute_triplet_loss(data, training=True)
            # Under tf.distribute each replica has a slice of the batch and the gradients
            # are summed over replicas: dividing each replica's mean by their number makes
            # the sum the gradient of the mean over the global batch.
            replicas = self.distribute_strategy.num_replicas_in_sync
            # Under mixed precision the optimizer is a LossScaleOptimizer: the scaled loss
            # keeps float16 gradients from underflowing, and apply_gradients unscales them.
            scaled_loss = self.optimizer.scale_loss(loss / replicas)
        trainable_weights = self.siamese_network.trainable_weights
        gradients = tape.gradient(scaled_loss, trainable_weights)
        self.optimizer.apply_gradients(zip(gradients, trainable_weights, strict=True))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, data):
        loss = self._compute_triplet_loss(data, training=False)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def _compute_triplet_loss(self, data, training):
        # The example calls the network without `training`; the head's BatchNormalization
        # layers must use batch statistics (and update their averages) in training only.
        ap_distance, an_distance = self(data, training=training)
        ap_distance = ops.cast(ap_distance, "float32")
        an_distance = ops.cast(an_distance, "float32")
        return ops.mean(triplet_loss(ap_distance, an_distance, self.margin))

    @property
    def metrics(self):
        # Listed here so that Keras resets the tracker at the start of every epoch.
        return [self.loss_tracker]


def train(siamese_model, train_dataset, val_dataset, settings, callbacks=()):
    """Compile with Adam and fit, validating on the fixed validation triplets.

    `settings.jit_compile` None leaves XLA to Keras ("auto": on with a GPU, off on CPU).
    """
    jit_compile = getattr(settings, "jit_compile", None)
    siamese_model.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        jit_compile="auto" if jit_compile is None else jit_compile,
    )
    return siamese_model.fit(
        train_dataset,
        epochs=settings.epochs,
        validation_data=val_dataset,
        callbacks=list(callbacks),
        shuffle=False,  # the dataset reshuffles itself every epoch
        verbose=2,
    )


# ---------------------------------------------------------------------------
# Inspecting what the network has learned
# ---------------------------------------------------------------------------


def cosine_similarities(first, second):
    """Cosine similarity of each row of `first` with the same row of `second`.

    The example reports one number per batch from a `CosineSimilarity` metric, and uses
    the same metric object for the positive and then the negative similarity, so its
    "negative similarity" is the running mean of both. Here every triplet has its own.
    """
    first = np.asarray(first, np.float64)
    second = np.asarray(second, np.float64)
    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    return np.sum(first * second, axis=1) / np.maximum(norms, 1e-12)


def pairwise_squared_distances(first, second):
    """Matrix of squared L2 distances between every row of `first` and of `second`."""
    first = np.asarray(first, np.float64)
    second = np.asarray(second, np.float64)
    squared = (
        np.sum(first**2, axis=1)[:, None]
        + np.sum(second**2, axis=1)[None, :]
        - 2 * first @ second.T
    )
    return np.maximum(squared, 0.0)


def triplet_accuracy(ap_distances, an_distances):
    """Fraction of triplets whose positive is closer to the anchor than the negative."""
    return float(np.mean(np.asarray(ap_distances) < np.asarray(an_distances)))


def recall_at_k(distance_matrix, ks=(1, 5, 10)):
    """Retrieval recall: row i's right answer is column i; is it among the k closest?

    Ties count against the right answer (it ranks behind every column at the same
    distance), so a model that maps everything to one point scores 0, not 1.
    """
    distance_matrix = np.asarray(distance_matrix)
    correct = np.diag(distance_matrix)[:, None]
    closer = np.sum(distance_matrix < correct, axis=1)
    tied = np.sum(distance_matrix == correct, axis=1) - 1
    rank = closer + tied
    return {k: float(np.mean(rank < k)) for k in ks}


def embed_images(embedding, filenames, image_size=target_shape, batch_size=batch_size):
    """The embedding of every image file, as a NumPy array (one row per file)."""
    return embedding.predict(image_batches(filenames, image_size, batch_size), verbose=0)


def evaluate_embeddings(anchors, positives, negative_indices):
    """Triplet accuracy, retrieval recall and similarities from the validation embeddings.

    `anchors[i]` and `positives[i]` embed the images of validation pair i, each image once;
    `negative_indices` index `anchors + positives`, as `choose_negatives` draws them, and
    give the fixed validation triplets. For retrieval, each anchor (`left`) ranks all
    validation positives (`right`) by distance, the task of the dataset's paper.
    """
    anchors = np.asarray(anchors, np.float32)
    positives = np.asarray(positives, np.float32)
    negatives = np.concatenate([anchors, positives])[np.asarray(negative_indices)]
    ap_distances = np.sum((anchors - positives) ** 2, axis=1)
    an_distances = np.sum((anchors - negatives) ** 2, axis=1)
    distance_matrix = pairwise_squared_distances(anchors, positives)
    recalls = recall_at_k(distance_matrix)
    return {
        "triplet_accuracy": triplet_accuracy(ap_distances, an_distances),
        **{f"recall_at_{k}": value for k, value in recalls.items()},
        "ap_distances": ap_distances,
        "an_distances": an_distances,
        "positive_similarities": cosine_similarities(anchors, positives),
        "negative_similarities": cosine_similarities(anchors, negatives),
        "distance_matrix": distance_matrix,
    }


# ---------------------------------------------------------------------------
# What this port adds: decode every image once, cache the frozen trunk's features
# ---------------------------------------------------------------------------

# A store larger than this share of the available memory goes to a file on disk.
memory_share_for_stores = 0.5


def available_memory():
    """Bytes of memory available to this process (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def new_store(shape, dtype, folder=None, memory_budget=None):
    """An uninitialised array for cached images or features: in memory if it fits.

    It fits when it takes at most `memory_budget` bytes (default: half the available
    memory). Otherwise it is a memory-mapped `.npy` file in `folder`, which the operating
    system pages in and out as the training reads it.
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if memory_budget is None:
        available = available_memory()
        memory_budget = size if available is None else available * memory_share_for_stores
    if size <= memory_budget:
        return np.empty(shape, dtype)
    if folder is None:
        raise ValueError(
            f"a cache of {size / 1e9:.1f} GB does not fit in memory and no folder was given"
        )
    handle, path = tempfile.mkstemp(dir=folder, prefix="store-", suffix=".npy")
    os.close(handle)
    print(f"Caching {size / 1e9:.1f} GB on disk in {path} (too large for memory)", flush=True)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))


def image_batches(filenames, image_size=target_shape, batch_size=batch_size):
    """A `tf.data` dataset of the image files, decoded as `preprocess_image` does, in order."""
    dataset = tf.data.Dataset.from_tensor_slices(list(filenames))
    dataset = dataset.map(
        lambda filename: preprocess_image(filename, image_size),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def decode_images_once(filenames, image_size=target_shape, folder=None, batch_size=batch_size):
    """Decode and resize every image file once, into a store (one row per file).

    The example decodes and resizes the three images of every triplet in every epoch; an
    image is in about three triplets per epoch, so some thirty decodes over the example's
    ten epochs. The store keeps the float32 pixels `preprocess_image` gives, so training
    on it computes exactly what the example computes.
    """
    filenames = list(filenames)
    store = new_store((len(filenames), *image_size, 3), np.float32, folder)
    return _fill_store(store, image_batches(filenames, image_size, batch_size).as_numpy_iterator())


def compute_trunk_features(
    trunk, filenames, image_size=target_shape, folder=None, batch_size=batch_size
):
    """Run the frozen trunk once over every image file; return a store of its features.

    The features keep the trunk's output dtype (float32, or float16 under mixed precision),
    so training on them computes exactly what training on the images would.
    """
    filenames = list(filenames)
    output = trunk.output
    store = new_store((len(filenames), *output.shape[1:]), output.dtype, folder)
    batches = image_batches(filenames, image_size, batch_size)
    return _fill_store(
        store, (ops.convert_to_numpy(trunk(batch, training=False)) for batch in batches)
    )


def _fill_store(store, batches):
    """Write consecutive batches of rows into `store`, from its first row; return it."""
    start = 0
    for batch in batches:
        store[start : start + len(batch)] = batch
        start += len(batch)
    return store


def gather_rows(store, indices):
    """Rows `indices` of a store, as a tensor (inside a `tf.data` map).

    NumPy does the gathering, so a store memory-mapped from disk works as well as one in
    memory.
    """
    rows = tf.numpy_function(
        lambda batch: np.asarray(store[batch]), [indices], tf.as_dtype(store.dtype), stateful=False
    )
    return tf.ensure_shape(rows, (None, *store.shape[1:]))


def make_store_dataset(store, triplet_indices, batch_size=batch_size):
    """Batches of (anchor, positive, negative) rows of `store`, for index triplets."""
    dataset = triplet_indices.batch(batch_size, drop_remainder=False)
    dataset = dataset.map(
        lambda anchor, positive, negative: tuple(
            gather_rows(store, indices) for indices in (anchor, positive, negative)
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return without_autotuning(dataset.prefetch(tf.data.AUTOTUNE))


def without_autotuning(dataset):
    """`dataset` with tf.data's autotuning thread turned off.

    Gathering stored rows leaves little to tune, and the thread made the deletion of each
    used-up iterator wait: on 2 cores, 4 of 10 epochs of the README's 300-pair run started
    1.4-1.9 s late, idle. Without it, `AUTOTUNE` stands for a fixed parallelism (the number
    of cores, at most 16).
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def embed_store(network, store, batch_size=batch_size):
    """`network` applied to every row of a store of images or features, as a NumPy array."""
    dataset = tf.data.Dataset.range(len(store)).batch(batch_size)
    dataset = dataset.map(
        lambda indices: gather_rows(store, indices), num_parallel_calls=tf.data.AUTOTUNE
    )
    return network.predict(dataset.prefetch(tf.data.AUTOTUNE), verbose=0)


def pipeline_throughput(dataset, batches):
    """Triplets per second that a dataset of triplet batches delivers, with no model."""
    iterator = iter(dataset)
    next(iterator)  # warm-up: the first batch pays for starting the threads
    count = 0
    start = time.perf_counter()
    for _ in range(batches):
        try:
            count += len(next(iterator)[0])
        except StopIteration:
            break
    elapsed = time.perf_counter() - start
    return count / elapsed if elapsed > 0 else float("inf")


# ---------------------------------------------------------------------------
# What this port adds: a synthetic dataset for offline runs
# ---------------------------------------------------------------------------


def _draw_scene(scene, image_size, rng, jitter):
    """Render one scene (background and shapes) as a uint8 image, perturbed by `jitter`."""
    height = width = image_size
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32) / image_size
    background = np.clip(scene["background"] + rng.normal(0, 12 * jitter, 3), 0, 255)
    image = np.broadcast_to(background, (height, width, 3)).astype(np.float32).copy()
    for kind, centre, size, colour in scene["shapes"]:
        centre = centre + rng.normal(0, 0.04 * jitter, 2)
        size = size * np.exp(rng.normal(0, 0.12 * jitter, 2))
        colour = np.clip(colour + rng.normal(0, 25 * jitter, 3), 0, 255)
        dy, dx = (rows - centre[0]) / size[0], (columns - centre[1]) / size[1]
        if kind == 0:
            mask = (np.abs(dy) < 1) & (np.abs(dx) < 1)
        elif kind == 1:
            mask = dy**2 + dx**2 < 1
        else:  # a stripe pattern clipped to an ellipse
            mask = (dy**2 + dx**2 < 1) & (np.sin(8 * dx + 4 * dy) > 0)
        image[mask] = colour
    image += rng.normal(0, 6 * jitter, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_synthetic_dataset(
    folder, pairs=dry_run_pairs, image_size=96, seed=seed, jitter=synthetic_jitter
):
    """Write a Totally-Looks-Like-style folder of generated pairs; return the folder.

    Each pair is one random scene (a background colour and two to four coloured shapes),
    drawn twice with independent perturbations of positions, sizes, colours and noise:
    `left/NNNNN.jpg` and `right/NNNNN.jpg` look alike, other pairs do not. `jitter` scales
    the perturbations (0 draws the same image twice).
    """
    if pairs < 1:
        raise ValueError(f"pairs must be positive, got {pairs}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    folder = pathlib.Path(folder)
    rng = np.random.default_rng(seed)
    for side in ("left", "right"):
        (folder / side).mkdir(parents=True, exist_ok=True)
    for index in range(pairs):
        shape_count = int(rng.integers(2, 5))
        scene = {
            "background": rng.uniform(0, 255, 3),
            "shapes": [
                (
                    int(rng.integers(0, 3)),
                    rng.uniform(0.2, 0.8, 2),
                    rng.uniform(0.1, 0.35, 2),
                    rng.uniform(0, 255, 3),
                )
                for _ in range(shape_count)
            ],
        }
        for side in ("left", "right"):
            image = _draw_scene(scene, image_size, rng, jitter)
            encoded = tf.io.encode_jpeg(image, quality=92)
            (folder / side / f"{index:05d}.jpg").write_bytes(encoded.numpy())
    return folder


# ---------------------------------------------------------------------------
# What this port adds: plots
# ---------------------------------------------------------------------------


def _pyplot():
    """Matplotlib's pyplot on the Agg backend (imported only when a plot is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def _save_figure(figure, path):
    """Save a figure as PNG (atomically) and close it."""
    pyplot = _pyplot()
    try:
        if path is not None:
            figure.tight_layout()
            with _atomic_path(path) as temporary:
                figure.savefig(temporary, format="png", dpi=90)
    finally:
        pyplot.close(figure)


def plot_loss(history_rows, path):
    """Training and validation loss per epoch."""
    pyplot = _pyplot()
    figure, axis = pyplot.subplots(figsize=(6, 4))
    epoch_numbers = [int(row["epoch"]) + 1 for row in history_rows]
    for key, label in (("loss", "training"), ("val_loss", "validation")):
        values = [float(row[key]) for row in history_rows if row.get(key) not in (None, "")]
        if len(values) == len(epoch_numbers):
            axis.plot(epoch_numbers, values, marker="o", label=label)
    axis.set_xlabel("epoch")
    axis.set_ylabel("triplet loss")
    axis.legend()
    _save_figure(figure, path)


def plot_distance_histograms(before, after, path):
    """Validation anchor-positive vs anchor-negative distances, before and after training."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(1, 2, figsize=(11, 4))
    for axis, evaluation, title in ((axes[0], before, "before"), (axes[1], after, "after")):
        distances = np.concatenate([evaluation["ap_distances"], evaluation["an_distances"]])
        bins = np.linspace(distances.min(), distances.max() + 1e-9, 30)
        axis.hist(evaluation["ap_distances"], bins=bins, alpha=0.6, label="anchor-positive")
        axis.hist(evaluation["an_distances"], bins=bins, alpha=0.6, label="anchor-negative")
        axis.set_title(f"{title} training")
        axis.set_xlabel("squared L2 distance")
        axis.legend()
    _save_figure(figure, path)


def plot_retrieval_examples(
    anchor_images, positive_images, distance_matrix, path, image_size, queries=4, top=5
):
    """For a few validation queries (left image): the 5 closest right images.

    The right answer, where it appears, has a green frame.
    """
    pyplot = _pyplot()
    queries = min(queries, len(anchor_images))
    top = min(top, len(positive_images))
    figure, axes = pyplot.subplots(queries, top + 1, figsize=(2 * (top + 1), 2 * queries))
    axes = np.asarray(axes).reshape(queries, top + 1)
    for row in range(queries):
        ranked = np.argsort(distance_matrix[row], kind="stable")[:top]
        pictures = [anchor_images[row]] + [positive_images[index] for index in ranked]
        for column, filename in enumerate(pictures):
            axis = axes[row, column]
            image = preprocess_image(filename, image_size).numpy() / 255.0
            axis.imshow(np.clip(image, 0.0, 1.0))
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_title("query")
            else:
                axis.set_title(f"#{column}")
                if ranked[column - 1] == row:
                    for spine in axis.spines.values():
                        spine.set_edgecolor("green")
                        spine.set_linewidth(4)
    _save_figure(figure, path)


# ---------------------------------------------------------------------------
# What this port adds: safe outputs and resumable training
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_path(path):
    """Yield a temporary name beside `path`, renamed to `path` if the block succeeds.

    Until then any earlier file at `path` stays as it was, whatever happens midway.
    """
    path = pathlib.Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(handle)
    # mkstemp makes the file private; give it the permissions a plain open() would.
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


def write_csv(rows, fieldnames, path):
    """Write dictionaries as CSV rows, atomically."""
    with _atomic_path(path) as temporary:
        with open(temporary, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


def save_model(model, path):
    """Save a Keras model as a `.keras` file, atomically."""
    with _atomic_path(path) as temporary:
        model.save(temporary)


def prepare_output_dir(output_dir, resume=False, overwrite=False, dry_run=False):
    """Create the output folder and check that this run may use it.

    A finished run (its `metrics.json`) is kept unless `overwrite`; a dry run may replace
    an earlier dry run. An interrupted run (its `backup/` folder) is continued with
    `resume`, replaced with `overwrite`, and refused otherwise. Returns the folder.
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
        if not (dry_run and _written_by_dry_run(metrics_path)):
            raise ValueError(
                f"--output-dir {output_dir} already holds a finished run; pass --overwrite "
                "to replace it or choose another --output-dir"
            )
        overwrite = True
    if backup_dir.exists() and not (resume or overwrite):
        raise ValueError(
            f"--output-dir {output_dir} holds an interrupted run; pass --resume to continue "
            "it or --overwrite to start over"
        )
    if overwrite:
        # metrics.json goes first: from here on the folder never looks finished.
        for name in OUTPUT_FILES:
            (output_dir / name).unlink(missing_ok=True)
        shutil.rmtree(backup_dir, ignore_errors=True)
    if not backup_dir.exists():
        # No backup to continue from: rows of an older attempt would be stale.
        (output_dir / "history-progress.csv").unlink(missing_ok=True)
    # Caches of a run that was killed before it could remove them; no run uses them now.
    for stale_cache in output_dir.glob(".cache-*"):
        shutil.rmtree(stale_cache, ignore_errors=True)
    return output_dir


def _written_by_dry_run(metrics_path):
    """Whether a `metrics.json` comes from a `--dry-run`."""
    try:
        return bool(json.loads(metrics_path.read_text()).get("dry_run"))
    except (OSError, ValueError, AttributeError):
        return False


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch run in this process (training and validation)."""

    def on_train_begin(self, logs=None):
        self.durations = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.durations.append(time.perf_counter() - self._start)


@contextlib.contextmanager
def _ctrl_c_deferred():
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
        with _ctrl_c_deferred():
            super().on_epoch_end(epoch, logs)


def training_callbacks(output_dir):
    """Log the epoch's row, then back up the training state, every epoch; time the epochs.

    The row comes first: if a run dies between the two, the resumed run repeats that epoch
    and logs it again, and `final_history` keeps the later row (the other order would lose
    the row of an epoch the backup already counts as done). The backup is kept when
    training ends and deleted only once every output is written, so a crash while saving
    resumes at the last epoch instead of training again.
    """
    return [
        keras.callbacks.CSVLogger(str(output_dir / "history-progress.csv"), append=True),
        InterruptSafeBackupAndRestore(
            backup_dir=str(output_dir / "backup"),
            double_checkpoint=True,
            delete_checkpoint=False,
        ),
        EpochTimer(),
    ]


def final_history(output_dir):
    """The logged epoch rows across interruptions: the last row of each epoch, in order."""
    path = pathlib.Path(output_dir) / "history-progress.csv"
    if not path.exists():
        return []
    with open(path, newline="") as stream:
        rows = {int(row["epoch"]): row for row in csv.DictReader(stream)}
    return [rows[epoch] for epoch in sorted(rows)]


# ---------------------------------------------------------------------------
# What this port adds: command line
# ---------------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    """An argument parser that reports a mistake in one line and exits with code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def _number(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _positive_float(text):
    value = _number(text)
    if not (value > 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _fraction(text):
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def _image_size(text):
    value = _positive_int(text)
    if value < minimum_image_size:
        raise argparse.ArgumentTypeError(
            f"must be at least {minimum_image_size} (the smallest input ResNet50 accepts), "
            f"got {value}"
        )
    return value


def _weights(text):
    # "none" stays a string here: None means "not given" until `resolve_settings`.
    return text.lower() if text.lower() in ("imagenet", "none") else text


def build_argument_parser():
    """The command line; the defaults are the example's."""
    parser = _ArgumentParser(
        prog="triplet_totally_looks_like.py",
        description="Train a Siamese network with a triplet loss on Totally Looks Like.",
    )
    parser.add_argument(
        "--data-dir",
        type=pathlib.Path,
        metavar="DIR",
        help="a folder holding left/ and right/ (default: download the dataset into ~/.keras)",
    )
    parser.add_argument(
        "--weights",
        type=_weights,
        metavar="{imagenet,none,PATH}",
        help="ResNet50 weights: imagenet, none (random) or the path of a local .h5 / "
        ".weights.h5 file (default imagenet; none with --dry-run)",
    )
    parser.add_argument(
        "--epochs", type=_positive_int, metavar="N", help="epochs (default 10; 1 with --dry-run)"
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=batch_size,
        metavar="N",
        help="triplets per batch (default 32)",
    )
    parser.add_argument(
        "--margin",
        type=_positive_float,
        metavar="MARGIN",
        default=margin,
        help="triplet-loss margin (default 0.5)",
    )
    parser.add_argument(
        "--learning-rate",
        type=_positive_float,
        metavar="RATE",
        default=learning_rate,
        help="Adam learning rate (default 0.0001)",
    )
    parser.add_argument(
        "--image-size",
        type=_image_size,
        metavar="N",
        help="images are resized to N x N pixels, N >= 32 (default 200; 64 with --dry-run)",
    )
    parser.add_argument(
        "--validation-split",
        type=_fraction,
        metavar="FRACTION",
        default=validation_split,
        help="fraction of the pairs held out for validation (default 0.2)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="N",
        default=seed,
        help="seed for the split, negatives, shuffles and weights (default 42)",
    )
    parser.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        help="use only the first N pairs (sorted by name)",
    )
    parser.add_argument(
        "--output-dir",
        type=pathlib.Path,
        metavar="DIR",
        help="where the model, history, metrics and plots go (default "
        "runs/triplet_totally_looks_like; runs/triplet_totally_looks_like_dry_run with "
        "--dry-run)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    parser.add_argument(
        "--cache-features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the frozen part of ResNet50 once per image and train the rest on its "
        "cached features (default on; --no-cache-features runs the whole network every "
        "step)",
    )
    parser.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        help="compute in float16, keep weights, distances and loss in float32 (default: on "
        "when TensorFlow sees a GPU, off otherwise)",
    )
    parser.add_argument(
        "--jit-compile",
        action=argparse.BooleanOptionalAction,
        help="compile the training step with XLA (default: Keras decides, on with a GPU)",
    )
    parser.add_argument(
        "--distribute",
        choices=("auto", "none", "mirrored"),
        default="auto",
        help="auto mirrors training over the GPUs when more than one is visible; mirrored "
        "forces tf.distribute.MirroredStrategy (over the CPU's logical devices without a "
        "GPU); none trains on one device (default auto)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"quick offline check: {dry_run_pairs} generated pairs in a temporary folder "
        f"(or --data-dir), {dry_run_image_size} x {dry_run_image_size} images, weights none, "
        "1 epoch; explicit flags still apply",
    )
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
    return parser


def resolve_settings(args):
    """Fill in the defaults that depend on `--dry-run`; return `args`."""
    if args.dry_run:
        args.epochs = args.epochs or dry_run_epochs
        args.image_size = args.image_size or dry_run_image_size
        args.weights = args.weights or "none"
        args.output_dir = args.output_dir or DRY_RUN_OUTPUT_DIR
    else:
        args.epochs = args.epochs or epochs
        args.image_size = args.image_size or target_shape[0]
        args.weights = args.weights or "imagenet"
        args.output_dir = args.output_dir or DEFAULT_OUTPUT_DIR
    if args.weights == "none":
        args.weights = None
    if args.mixed_precision is None:
        args.mixed_precision = bool(tf.config.list_physical_devices("GPU"))
    if args.weights not in (None, "imagenet") and not pathlib.Path(args.weights).is_file():
        raise ValueError(
            f"--weights {args.weights}: no such file (give imagenet, none or the path of a "
            "ResNet50 .h5 / .weights.h5 weights file)"
        )
    return args


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
    strategy = tf.distribute.MirroredStrategy([logical.name for logical in devices])
    replicas = strategy.num_replicas_in_sync
    return strategy, f"Device: {device}, MirroredStrategy over {replicas} replicas"


def resume_settings(args):
    """The settings a resumed run must share with the run it continues.

    They decide the shapes of the saved training state or what it means; --epochs,
    --distribute, --jit-compile and the output options may change.
    """
    return {
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "margin": args.margin,
        "learning_rate": args.learning_rate,
        "weights": None if args.weights is None else str(args.weights),
        "cache_features": bool(args.cache_features),
        "mixed_precision": bool(args.mixed_precision),
    }


def _interrupted_run_record(output_dir, name):
    """The JSON file `name` of the interrupted run in `output_dir`; None if there is none."""
    path = output_dir / name
    if not (output_dir / "backup").exists() or not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_resumed_settings(output_dir, settings):
    """A resumed run must use the settings of the run it continues."""
    earlier = _interrupted_run_record(output_dir, "settings.json")
    if earlier is None:
        return
    changed = [
        f"--{key.replace('_', '-')} {earlier.get(key)} -> {value}"
        for key, value in settings.items()
        if earlier.get(key) != value
    ]
    if changed:
        raise ValueError(
            f"the interrupted run in {output_dir} used other settings "
            f"({', '.join(changed)}); rerun its exact command with --resume, or pass "
            "--overwrite to start over"
        )


def _check_resumed_split(output_dir, split):
    """A resumed run must train on the same split as the run it continues."""
    earlier = _interrupted_run_record(output_dir, "split.json")
    if earlier is not None and earlier != split:
        raise ValueError(
            f"the pairs or their split differ from those of the interrupted run in "
            f"{output_dir} (data, --limit, --validation-split or --seed changed); rerun "
            "its exact command with --resume, or pass --overwrite to start over"
        )


def load_pairs(data_dir, limit=None):
    """The readable pairs of `data_dir` (the first `limit`), and the names of skipped ones."""
    anchor_images, positive_images = find_image_pairs(data_dir)
    print(f"{len(anchor_images)} image pairs in {data_dir}", flush=True)
    if limit is not None:
        anchor_images, positive_images = anchor_images[:limit], positive_images[:limit]
    anchor_images, positive_images, skipped = drop_unreadable_pairs(anchor_images, positive_images)
    if skipped:
        print(f"Skipped {len(skipped)} pairs with unreadable images", flush=True)
    return anchor_images, positive_images, skipped


def run(args):
    """Load the data, train, evaluate and save, according to the parsed arguments."""
    resolve_settings(args)
    strategy, device_line = choose_strategy(args.distribute)
    print(device_line, flush=True)
    keras.utils.set_random_seed(args.seed)
    with contextlib.ExitStack() as stack:
        if args.data_dir is not None:
            data_dir = args.data_dir
        elif args.dry_run:
            data_dir = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory()))
            make_synthetic_dataset(data_dir, pairs=dry_run_pairs, seed=args.seed)
        else:
            data_dir = download_dataset()
        anchor_images, positive_images, skipped = load_pairs(data_dir, args.limit)

        train_indices, val_indices = split_pairs(
            len(anchor_images), args.validation_split, args.seed
        )
        if args.batch_size > len(train_indices):
            raise ValueError(
                f"--batch-size {args.batch_size} is larger than the {len(train_indices)} "
                "training pairs; lower --batch-size or use more pairs"
            )
        data = argparse.Namespace(
            data_dir=data_dir,
            skipped=skipped,
            train_anchors=[anchor_images[i] for i in train_indices],
            train_positives=[positive_images[i] for i in train_indices],
            val_anchors=[anchor_images[i] for i in val_indices],
            val_positives=[positive_images[i] for i in val_indices],
            val_negatives=choose_negatives(len(val_indices), args.seed),
        )
        print(
            f"{len(train_indices)} training pairs, {len(val_indices)} validation pairs",
            flush=True,
        )
        output_dir = prepare_output_dir(args.output_dir, args.resume, args.overwrite, args.dry_run)
        policy = keras.mixed_precision.dtype_policy()
        try:
            if args.mixed_precision:
                keras.mixed_precision.set_global_policy("mixed_float16")
            return train_and_evaluate(args, data, output_dir, strategy)
        except KeyboardInterrupt:
            if (output_dir / "backup" / "training_metadata.json").exists():
                message = (
                    f"interrupted: the training state of the last finished epoch is saved in "
                    f"{output_dir / 'backup'}; run the same command with --resume to continue"
                )
            else:
                message = "interrupted before the first epoch finished; nothing to resume"
            raise KeyboardInterrupt(message) from None
        finally:
            keras.mixed_precision.set_global_policy(policy)


def train_and_evaluate(args, data, output_dir, strategy=None):
    """Train on the prepared pairs, evaluate before and after, write every output."""
    strategy = strategy or tf.distribute.get_strategy()
    image_size = (args.image_size, args.image_size)
    split = {
        "train": [os.path.basename(name) for name in data.train_anchors],
        "validation": [os.path.basename(name) for name in data.val_anchors],
    }
    settings = resume_settings(args)
    _check_resumed_split(output_dir, split)
    _check_resumed_settings(output_dir, settings)
    write_json(split, output_dir / "split.json")
    write_json(settings, output_dir / "settings.json")
    if not args.no_plots:
        examples = make_dataset(
            training_triplets(data.train_anchors, data.train_positives, args.seed), image_size, 3
        )
        visualize(*next(iter(examples)), path=output_dir / "triplets.png")

    # Caches too large for memory go to disk in this folder, removed when the run ends.
    with (
        tempfile.TemporaryDirectory(dir=output_dir, prefix=".cache-") as cache_folder,
        strategy.scope(),
    ):
        embedding = build_embedding_network(image_size, args.weights)
        started = time.perf_counter()
        train_files = data.train_anchors + data.train_positives
        val_files = data.val_anchors + data.val_positives
        if args.cache_features:
            trunk, network = split_embedding_network(embedding)
            train_store, val_store = (
                compute_trunk_features(trunk, files, image_size, cache_folder, args.batch_size)
                for files in (train_files, val_files)
            )
        else:
            network = embedding
            train_store, val_store = (
                decode_images_once(files, image_size, cache_folder, args.batch_size)
                for files in (train_files, val_files)
            )
        seconds_caching = time.perf_counter() - started
        what = "features of the frozen trunk" if args.cache_features else "decoded images"
        print(
            f"Cached the {what} of {len(train_store) + len(val_store)} images "
            f"({(train_store.nbytes + val_store.nbytes) / 1e6:,.1f} MB) in "
            f"{seconds_caching:.1f} s",
            flush=True,
        )
        train_dataset = make_store_dataset(
            train_store,
            training_triplet_indices(len(data.train_anchors), args.seed),
            args.batch_size,
        )
        val_dataset = make_store_dataset(
            val_store, validation_triplet_indices(data.val_negatives), args.batch_size
        )
        siamese_model = SiameseModel(build_siamese_network(network), margin=args.margin)

        def evaluate():
            embeddings = embed_store(network, val_store, args.batch_size)
            pair_count = len(data.val_anchors)
            return evaluate_embeddings(
                embeddings[:pair_count], embeddings[pair_count:], data.val_negatives
            )

        before = evaluate()
        callbacks = training_callbacks(output_dir)
        train(siamese_model, train_dataset, val_dataset, args, callbacks)
        timer = callbacks[-1]
        after = evaluate()
    history_rows = final_history(output_dir)

    # Inspecting what the network has learned, triplet by triplet.
    print("Cosine similarity of validation anchors to their positive and negative:")
    for row in range(min(5, len(data.val_anchors))):
        print(
            f"  {os.path.basename(data.val_anchors[row])}: "
            f"positive {after['positive_similarities'][row]:+.4f}, "
            f"negative {after['negative_similarities'][row]:+.4f}"
        )
    metrics = {
        "val_loss": float(history_rows[-1]["val_loss"]) if history_rows else None,
        "triplet_accuracy_before": before["triplet_accuracy"],
        "triplet_accuracy": after["triplet_accuracy"],
        "recall_at_1_before": before["recall_at_1"],
        "recall_at_5_before": before["recall_at_5"],
        "recall_at_10_before": before["recall_at_10"],
        "recall_at_1": after["recall_at_1"],
        "recall_at_5": after["recall_at_5"],
        "recall_at_10": after["recall_at_10"],
        "positive_similarity": float(np.mean(after["positive_similarities"])),
        "negative_similarity": float(np.mean(after["negative_similarities"])),
        "seconds_per_epoch": float(np.mean(timer.durations)) if timer.durations else None,
        "seconds_caching": seconds_caching,
        "epochs": len(history_rows),
        "training_pairs": len(data.train_anchors),
        "validation_pairs": len(data.val_anchors),
        "skipped_pairs": data.skipped,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "margin": args.margin,
        "learning_rate": args.learning_rate,
        "weights": None if args.weights is None else str(args.weights),
        "seed": args.seed,
        "cache_features": bool(args.cache_features),
        "mixed_precision": bool(args.mixed_precision),
        "jit_compile": args.jit_compile,
        "replicas": strategy.num_replicas_in_sync,
        "dry_run": bool(args.dry_run),
    }
    write_outputs(args, data, output_dir, embedding, history_rows, before, after, metrics)

    print(f"Saved the embedding model, history, metrics and plots in {output_dir}")
    print(
        f"* Triplet accuracy: {before['triplet_accuracy']:.3f} before training, "
        f"{after['triplet_accuracy']:.3f} after"
    )
    print(
        f"* Recall@1: {before['recall_at_1']:.3f} before training, {after['recall_at_1']:.3f} after"
    )
    return metrics


def write_outputs(args, data, output_dir, embedding, history_rows, before, after, metrics):
    """Write the model, history, similarities, plots and, last, metrics.json."""
    image_size = (args.image_size, args.image_size)
    save_model(embedding, output_dir / "embedding.keras")
    write_csv(
        history_rows,
        list(history_rows[0]) if history_rows else ["epoch", "loss", "val_loss"],
        output_dir / "history.csv",
    )
    pool = data.val_anchors + data.val_positives
    similarity_rows = [
        {
            "anchor": os.path.basename(data.val_anchors[row]),
            "positive": os.path.basename(data.val_positives[row]),
            "negative": os.path.relpath(pool[data.val_negatives[row]], data.data_dir),
            "positive_similarity": f"{after['positive_similarities'][row]:.6f}",
            "negative_similarity": f"{after['negative_similarities'][row]:.6f}",
            "positive_distance": f"{after['ap_distances'][row]:.6g}",
            "negative_distance": f"{after['an_distances'][row]:.6g}",
        }
        for row in range(len(data.val_anchors))
    ]
    write_csv(similarity_rows, list(similarity_rows[0]), output_dir / "similarities.csv")
    if not args.no_plots:
        plot_loss(history_rows, output_dir / "loss.png")
        plot_distance_histograms(before, after, output_dir / "distances.png")
        plot_retrieval_examples(
            data.val_anchors,
            data.val_positives,
            after["distance_matrix"],
            output_dir / "retrieval.png",
            image_size,
        )
    # metrics.json marks the run as finished, so it comes last; only then does the
    # backup of the training state go.
    write_json(metrics, output_dir / "metrics.json")
    shutil.rmtree(output_dir / "backup", ignore_errors=True)
    (output_dir / "history-progress.csv").unlink(missing_ok=True)


def main(argv=None):
    """Command-line entry point; returns the exit code."""
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt as interrupt:
        message = str(interrupt) or "interrupted before training started; nothing was saved"
        print(f"{parser.prog}: {message}", file=sys.stderr)
        return 130
    except (ValueError, OSError, DownloadError) as error:
        print(f"{parser.prog}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
