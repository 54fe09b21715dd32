"""MNIST from Keras's download, a `mnist.npz`-style file or the four official IDX files.

The tutorial calls `mnist.load_data()`; people also bring their own copy, sometimes damaged
or in another layout. Reading and checking it is not the tutorial's subject, so it lives
here, in NumPy (Keras is imported only to download).
"""

import gzip
import pathlib
import struct

import numpy as np

from siamese_support.command_line import DownloadError, one_line

num_classes = 10
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
DATA_TAKES = (
    "--data takes a mnist.npz-style file (arrays x_train, y_train, x_test, y_test) or a "
    "folder holding the four official *-idx?-ubyte.gz files"
)
# The starts `np.load` tells apart: a zip of named arrays (.npz) and a single array (.npy).
# It reads any other file as a pickle and refuses it with advice to pass allow_pickle=True,
# which would run whatever code the file holds; such files are refused before np.load.
NPZ_STARTS = (b"PK\x03\x04", b"PK\x05\x06")
NPY_START = b"\x93NUMPY"
# Files people pass by mistake, named in the message so that they see what went wrong.
OTHER_FILE_STARTS = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x1f\x8b", "a gzip file"),
    (b"\x80", "a Python pickle"),
)


def load_mnist(path=None):
    """Return `(x_train, y_train), (x_test, y_test)` as uint8 arrays.

    `path` is a file in the layout of Keras's `mnist.npz`, or a folder holding the four
    official `*-idx?-ubyte.gz` files; `None` downloads MNIST through Keras (cached under
    `~/.keras/datasets`, checked against its published hash). Images stay uint8 here and are
    scaled to float32 in [0, 1] batch by batch in the input pipeline, which keeps a quarter
    of the memory a float32 copy of the dataset would take.
    """
    if path is None:
        import keras

        try:
            (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        except Exception as error:  # Keras raises a bare Exception on fetch failure
            raise DownloadError(
                f"could not download MNIST ({one_line(error)}); without a network, "
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


def _file_start(path, size=8):
    """The first `size` bytes of a file (fewer if it is shorter)."""
    with open(path, "rb") as stream:
        return stream.read(size)


def _not_npz_message(path, start):
    """The one line for a file that is neither a .npz nor a .npy, naming what it seems to be."""
    kind = next((name for prefix, name in OTHER_FILE_STARTS if start.startswith(prefix)), None)
    if not start:
        kind = "an empty file"
    elif kind is None and all(32 <= byte < 127 or byte in b"\t\n\r" for byte in start):
        kind = "a text file"
    seems = f"{kind}, not" if kind else "not"
    return f"--data {path}: {seems} a .npz file; {DATA_TAKES}"


def _array(archive, name):
    """One array of an open .npz; an array of Python objects is refused, never unpickled."""
    try:
        return archive[name]
    except ValueError as error:
        # NumPy's own message names allow_pickle, inviting a fix that would run the file's code.
        if "allow_pickle" not in str(error):
            raise
        raise ValueError(
            f"{name} holds Python objects, not numbers; they are not unpickled, as that could "
            "run code the file holds"
        ) from None


def _read_npz(path):
    """Read the four arrays of a `mnist.npz`-style file (never unpickling anything)."""
    try:
        start = _file_start(path)
    except OSError as error:
        raise ValueError(f"--data {path}: not a readable .npz file ({one_line(error)})") from None
    if not start.startswith(NPZ_STARTS + (NPY_START,)):
        raise ValueError(_not_npz_message(path, start))
    try:
        if start.startswith(NPY_START):
            raise ValueError("it holds a single array, not named arrays")
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in IDX_FILES if name not in archive.files]
            if missing:
                raise KeyError(", ".join(missing))
            return {name: _array(archive, name) for name in IDX_FILES}
    except KeyError as error:
        raise ValueError(
            f"--data {path}: missing arrays {error.args[0]} (expected x_train, "
            "y_train, x_test, y_test as in Keras's mnist.npz)"
        ) from None
    except Exception as error:
        raise ValueError(f"--data {path}: not a readable .npz file ({one_line(error)})") from None


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
    """Check shapes, lengths and value ranges; return the arrays as uint8.

    Images stored as fractions in [0, 1] (a common float layout) are scaled to 0-255.
    """
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
        if not np.issubdtype(labels.dtype, np.integer) or (
            labels.min() < 0 or labels.max() >= num_classes
        ):
            raise ValueError(f"{source}: y_{split} must hold integer digit classes 0-9")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(
            f"{source}: training images are {arrays['x_train'].shape[1:]}, "
            f"test images {arrays['x_test'].shape[1:]}; they must match"
        )
    scales = {name: pixel_scale(arrays[name], name, source) for name in ("x_train", "x_test")}
    if len(set(scales.values())) > 1:
        raise ValueError(
            f"{source}: x_train looks scaled to 0-{scales['x_train']:g} and x_test to "
            f"0-{scales['x_test']:g}; store both in the same scale"
        )
    scale = scales["x_train"]
    if arrays["x_train"].dtype != np.uint8 or arrays["x_test"].dtype != np.uint8:
        # Say how the numbers were read: a wrong guess here would train on garbage.
        print(
            f"{source}: images are {arrays['x_train'].dtype} values in [0, {scale:g}]; "
            "read as pixel values 0-255" + (" (multiplied by 255)" if scale == 1 else ""),
            flush=True,
        )
    x_train, x_test = (to_pixels(arrays[name], scale) for name in ("x_train", "x_test"))
    y_train, y_test = (np.asarray(arrays[name], np.uint8) for name in ("y_train", "y_test"))
    return (x_train, y_train), (x_test, y_test)


def pixel_scale(images, name, source):
    """The top of the scale `images` are stored in: 255 (pixel values) or 1 (fractions).

    Any integer, float or boolean dtype is accepted. Values up to 1 are read as fractions
    of full brightness, the common float layout; larger values, up to 255, as pixel values.
    NaN, infinite, negative or larger values, and images that are all black, are refused:
    no scale would make them digits.
    """
    if images.dtype == np.uint8:
        return 255
    if images.dtype == np.bool_:
        return 1
    if not np.issubdtype(images.dtype, np.number) or np.issubdtype(
        images.dtype, np.complexfloating
    ):
        raise ValueError(f"{source}: {name} holds {images.dtype} values, not pixel values")
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        raise ValueError(f"{source}: {name} holds NaN or infinite values")
    low, high = images.min(), images.max()
    if low < 0 or high > 255:
        raise ValueError(
            f"{source}: {name} must hold pixel values 0-255 (or fractions 0-1), found "
            f"values from {low:g} to {high:g}"
        )
    if high == 0:
        raise ValueError(f"{source}: {name} is all zeros: no scale makes digits of it")
    return 1 if high <= 1 else 255


def to_pixels(images, scale):
    """`images` in the scale `pixel_scale` found, as uint8 pixel values 0-255 (rounded)."""
    if images.dtype == np.uint8:
        return images
    if scale == 1:
        return np.rint(np.asarray(images, np.float32) * 255).astype(np.uint8)
    return np.rint(images).astype(np.uint8)


def load_limited(path, limit):
    """`load_mnist(path)`, then the first `limit` images of each split (`limit_images`).

    Returns `(x_train, y_train), (x_test, y_test)`; every digit keeps two images a split.
    """
    (x_train, y_train), (x_test, y_test) = load_mnist(path)
    train = limit_images(x_train, y_train, limit, "training")
    return train, limit_images(x_test, y_test, limit, "test")


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
