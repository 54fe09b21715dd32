"""Write a full-size stand-in for MNIST (60,000 training images) for memory and time checks.

Only part of MNIST's training set is on these machines, so the stand-in repeats the
available training images, each copy shifted by a pixel or two in a different direction so
that no two images are identical, until it holds 60,000 of them; the test set is kept as it
is. The 22,699 images of a partial MNIST take 3 copies; the 5,000 of data/mnist-tiny.npz, 12
(what the GPU check makes, where no other MNIST is at hand).
It has the shapes, dtype and class balance of the real `mnist.npz`, which is what the
memory and time of `mnist_siamese.py` depend on, not its accuracy.

    python benchmarks/make_mnist_standin.py /tmp/mnist-22699.npz /tmp/mnist-60k.npz
    python benchmarks/make_mnist_standin.py data/mnist-tiny.npz /tmp/mnist-60k-from-tiny.npz
"""

import argparse
import sys

import numpy as np

TRAINING_IMAGES = 60_000
# The first copies of the first stand-ins, in the same order, then shifts by two pixels.
SHIFTS = [(0, 0), (0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1)]
SHIFTS += [(0, 2), (2, 0), (0, -2), (-2, 0), (2, 2), (-2, -2), (2, -2), (-2, 2)]


def make_standin(source, output, count=TRAINING_IMAGES):
    """Repeat `source`'s training images, shifted, up to `count`; write an .npz."""
    with np.load(source) as mnist:
        x_train, y_train = mnist["x_train"], mnist["y_train"]
        x_test, y_test = mnist["x_test"], mnist["y_test"]
    copies = -(-count // len(x_train))
    if copies > len(SHIFTS):
        raise ValueError(f"{source} holds too few training images to reach {count}")
    shifted = [np.roll(x_train, shift, axis=(1, 2)) for shift in SHIFTS[:copies]]
    images = np.concatenate(shifted)[:count]
    labels = np.tile(y_train, copies)[:count]
    np.savez(output, x_train=images, y_train=labels, x_test=x_test, y_test=y_test)
    return images.shape


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="an mnist.npz-style file")
    parser.add_argument("output", help="where to write the stand-in .npz")
    args = parser.parse_args(argv)
    shape = make_standin(args.source, args.output)
    print(f"wrote {args.output}: x_train {shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
