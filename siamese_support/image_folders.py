"""The `left/` and `right/` folders of an image-pair dataset, checked before training.

The tutorial lists both folders and trusts them. Real folders hold hidden files, files
whose partner is missing, and images that cannot be decoded; finding those before training
starts is not the tutorial's subject, so it lives here.
"""

import concurrent.futures
import os
import pathlib
import re
import sys

import numpy as np

from siamese_support.command_line import one_line
from siamese_support.devices import keras_backend, stderr_silenced

# The extensions `keras.utils.image_dataset_from_directory` reads, which the decoder knows.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")


def is_image_file(path):
    """Whether `path` is a visible file with an image extension (any case).

    Hidden files (`.DS_Store`, editors' `._name`), Windows' `Thumbs.db` and `desktop.ini`,
    sub-folders and notes are not; an empty or damaged image is, and is skipped later by
    `drop_unreadable_pairs` with a warning.
    """
    return (
        not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )


def find_image_pairs(data_dir):
    """The sorted image paths of `data_dir/left` (anchors) and `data_dir/right` (positives).

    The two folders must hold the same number of files, and their sorted names must match
    pair by pair (the extension may differ). What is not an image file is ignored, as
    `keras.utils.image_dataset_from_directory` does, and counted in one printed line.
    """
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(
            f"--data-dir {data_dir}: no such folder (it must hold left/ and right/, the "
            "Totally Looks Like layout)"
        )
    folders, ignored = {}, 0
    for side in ("left", "right"):
        folder = data_dir / side
        if not folder.is_dir():
            raise ValueError(
                f"--data-dir {data_dir} has no {side}/ folder; it must hold left/ and "
                "right/ with one image of each pair in each"
            )
        entries = list(folder.iterdir())
        files = sorted((path for path in entries if is_image_file(path)), key=lambda p: p.name)
        ignored += len(entries) - len(files)
        if not files:
            raise ValueError(f"{folder} holds no images")
        folders[side] = files
    if ignored:
        print(
            f"Ignored {ignored} entries that are not images in {data_dir}'s left/ and right/ "
            "(hidden files, Thumbs.db, desktop.ini, sub-folders, other extensions)",
            flush=True,
        )
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


def decoding_errors():
    """The exceptions a failed decoding raises: Pillow's `ValueError` and `OSError`, and
    TensorFlow's `OpError` where TensorFlow is the backend."""
    if keras_backend() != "tensorflow":
        return (ValueError, OSError)
    import tensorflow as tf

    return (ValueError, OSError, tf.errors.OpError)


def _decode_error_reason(error):
    """TensorFlow's decoding error message without its graph-node prefix and op suffix."""
    message = getattr(error, "message", None) or str(error)
    message = re.sub(r"\{\{[^}]*\}\}\s*", "", message)
    message = re.sub(r"\s*\[Op:\w+\].*$", "", message, flags=re.S)
    return one_line(message.strip() or type(error).__name__)


def find_unreadable_images(filenames, decode_image):
    """The files among `filenames` that `decode_image` (the training's decoder) cannot read.

    Returns `{filename: reason}`. All files are decoded once, in parallel, with the same
    decoder as the training pipeline, so a corrupt or truncated file is found before
    training starts instead of stopping it midway. Under JAX and PyTorch, `decode_image`
    (Pillow) reads the files' bytes in one thread per core.
    """
    filenames = list(filenames)
    if not filenames:
        return {}
    if keras_backend() != "tensorflow":
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            reasons = pool.map(lambda name: _reading_error(name, decode_image), filenames)
            return {name: why for name, why in zip(filenames, reasons, strict=True) if why}
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(
        (np.arange(len(filenames), dtype=np.int64), filenames)
    )
    dataset = dataset.map(
        lambda index, filename: (index, tf.shape(decode_image(tf.io.read_file(filename)))),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    # The JPEG library prints its own complaints about bad files to stderr; they are
    # replaced by one warning per file from the caller.
    with stderr_silenced():
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


def _reading_error(filename, decode_image):
    """Why `decode_image` cannot read the file's bytes, or None when it can (Pillow's path)."""
    try:
        decode_image(pathlib.Path(filename).read_bytes())
    except (ValueError, OSError) as error:
        return one_line(getattr(error, "strerror", None) or str(error) or type(error).__name__)
    return None


def drop_unreadable_pairs(anchor_images, positive_images, decode_image):
    """Skip every pair with an unreadable image, with a warning naming the file.

    Returns `(anchor_images, positive_images, skipped_anchor_names)`.
    """
    unreadable = find_unreadable_images(list(anchor_images) + list(positive_images), decode_image)
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


def load_pairs(data_dir, limit, decode_image):
    """The readable pairs of `data_dir` (of its first `limit`), and the names of skipped ones.

    Returns `(anchor_images, positive_images, skipped_anchor_names)`, and prints how many
    pairs the folder holds and how many were skipped.
    """
    anchor_images, positive_images = find_image_pairs(data_dir)
    print(f"{len(anchor_images)} image pairs in {data_dir}", flush=True)
    if limit is not None:
        anchor_images, positive_images = anchor_images[:limit], positive_images[:limit]
    anchor_images, positive_images, skipped = drop_unreadable_pairs(
        anchor_images, positive_images, decode_image
    )
    if skipped:
        print(f"Skipped {len(skipped)} pairs with unreadable images", flush=True)
    return anchor_images, positive_images, skipped
