"""Build the small real-MNIST fixture that `mnist_siamese.py --dry-run` and the tests use.

The fixture is cut from a copy of MNIST in the layout of Keras's `mnist.npz` (by default the
one `keras.datasets.mnist.load_data()` keeps in `~/.keras/datasets/`). It keeps the first
images of each split in their official order, so every digit class is present. The arrays
go into a zip with LZMA compression, which `numpy.load` reads like any `.npz` and which
holds about 15 % more digits in the 1 MB the fixture may take than `numpy.savez_compressed`
would.

    python tools/make_mnist_fixture.py                       # writes data/mnist-tiny.npz
    python tools/make_mnist_fixture.py --train 5000 --test 1000 --source PATH --output PATH

MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges, under the Creative
Commons Attribution-Share Alike 3.0 license (see data/README.md).
"""

import argparse
import hashlib
import pathlib
import sys
import zipfile

import numpy as np

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = pathlib.Path.home() / ".keras" / "datasets" / "mnist.npz"
DEFAULT_OUTPUT = REPOSITORY / "data" / "mnist-tiny.npz"


def make_fixture(source, output, train_count, test_count):
    """Write the first `train_count` training and `test_count` test images to `output`."""
    with np.load(source) as mnist:
        arrays = {
            "x_train": mnist["x_train"][:train_count],
            "y_train": mnist["y_train"][:train_count],
            "x_test": mnist["x_test"][:test_count],
            "y_test": mnist["y_test"][:test_count],
        }
    for name in ("y_train", "y_test"):
        classes = np.unique(arrays[name])
        if len(classes) != 10:
            raise ValueError(f"{name} of the fixture holds only classes {classes}")
    output.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(output, "w", compression=zipfile.ZIP_LZMA) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return arrays


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=pathlib.Path, default=DEFAULT_SOURCE)
    parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--train", type=int, default=5000, help="training images")
    parser.add_argument("--test", type=int, default=1000, help="test images")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        parser.error(
            f"{args.source} not found: give --source, or download MNIST once with "
            "python -c 'import keras; keras.datasets.mnist.load_data()'"
        )
    arrays = make_fixture(args.source, args.output, args.train, args.test)
    digest = hashlib.sha256(args.output.read_bytes()).hexdigest()
    print(
        f"wrote {args.output}: {len(arrays['x_train'])} training and "
        f"{len(arrays['x_test'])} test images, "
        f"{args.output.stat().st_size / 1e6:.2f} MB, sha256 {digest}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
