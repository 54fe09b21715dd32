"""Real-image pairs in the Totally Looks Like layout, composed of MNIST digits, for offline checks.

The generated scenes of `synthetic` check that the triplet model learns, but they are not
real images. Totally Looks Like itself needs a download. This module composes a small
dataset of real images from the MNIST subset that the repository ships
(`data/mnist-tiny.npz`): each pair is a four-digit number, written twice by different hands.
`left/NNNNN.png` shows the number's four digits in a 2 x 2 grid, each an MNIST image of that
digit; `right/NNNNN.png` shows the same four digits, each a different MNIST image of it. No
MNIST image is used twice in the dataset, and no two pairs have the same number, so an image
of another pair is never a second picture of the same thing (with single digits as pairs, a
tenth of the "negatives" would be the anchor's own digit, and mining would pick them first).
Two pairs may share some digits, which makes some negatives harder than others.

MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges, under the Creative
Commons Attribution-Share Alike 3.0 licence (see `data/README.md`); a dataset made here is
a derivative of it, under the same licence, and says so in the README.txt it writes.
"""

import pathlib

import numpy as np

# The MNIST subset shipped in the repository's data/ folder.
DEFAULT_SOURCE = pathlib.Path(__file__).resolve().parent.parent / "data" / "mnist-tiny.npz"
digits_per_image = 4  # a 2 x 2 grid of 28 x 28 digits: 56 x 56 pixels

LICENCE_NOTE = """Real-image pairs in the Totally Looks Like layout, made by tools/make_real_tll.py

Each pair is a four-digit number (see numbers.csv): left/NNNNN.png and right/NNNNN.png show
its four digits in a 2 x 2 grid, each digit a different handwritten MNIST image. No MNIST
image appears twice.

The images are taken from MNIST by Yann LeCun, Corinna Cortes and Christopher J.C. Burges
(by default the subset in data/mnist-tiny.npz), available under the
Creative Commons Attribution-Share Alike 3.0 license
(https://creativecommons.org/licenses/by-sa/3.0/). This dataset is a derivative of MNIST
and is distributed under the same license.
"""


def load_digit_images(source=DEFAULT_SOURCE):
    """All images of a `mnist.npz`-style file (training and test), and their labels."""
    with np.load(source) as arrays:
        images = np.concatenate([arrays["x_train"], arrays["x_test"]])
        labels = np.concatenate([arrays["y_train"], arrays["y_test"]])
    return images, labels


def compose(digit_images):
    """Four 28 x 28 digit images as one 56 x 56 image: first row 1 and 2, second row 3 and 4."""
    top = np.concatenate(digit_images[:2], axis=1)
    bottom = np.concatenate(digit_images[2:], axis=1)
    return np.concatenate([top, bottom], axis=0)


def number_pairs(images, labels, pairs, seed=0):
    """`(numbers, left, right)`: `pairs` distinct four-digit numbers, each drawn twice.

    `left[i]` and `right[i]` are 56 x 56 uint8 images of the digits of `numbers[i]` (a
    string), composed of MNIST images that are all different. A digit whose images run out
    is a ValueError that says how many pairs the source allows.
    """
    if not 1 <= pairs <= 10**digits_per_image:
        raise ValueError(f"pairs must be between 1 and {10**digits_per_image}, got {pairs}")
    rng = np.random.default_rng(seed)
    numbers = rng.choice(10**digits_per_image, size=pairs, replace=False)
    numbers = [f"{number:0{digits_per_image}d}" for number in numbers]
    # Each digit's images in a random order, taken from the front as they are used.
    pools = {digit: list(rng.permutation(np.flatnonzero(labels == digit))) for digit in range(10)}
    needed = {digit: 2 * sum(number.count(str(digit)) for number in numbers) for digit in pools}
    short = [digit for digit in pools if needed[digit] > len(pools[digit])]
    if short:
        raise ValueError(
            f"{pairs} pairs need {needed[short[0]]} images of the digit {short[0]}, and the "
            f"source holds {len(pools[short[0]])}; use fewer pairs"
        )
    left, right = [], []
    for number in numbers:
        for side in (left, right):
            side.append(compose([images[pools[int(digit)].pop()] for digit in number]))
    return numbers, np.stack(left), np.stack(right)


def make_real_dataset(folder, pairs=300, seed=0, source=DEFAULT_SOURCE):
    """Write the pairs of `number_pairs` as `left/` and `right/` PNG files; return the folder.

    Besides the two image folders, `numbers.csv` names each pair's number and `README.txt`
    states where the images come from and their licence.
    """
    from PIL import Image

    images, labels = load_digit_images(source)
    numbers, left, right = number_pairs(images, labels, pairs, seed)
    folder = pathlib.Path(folder)
    for side, side_images in (("left", left), ("right", right)):
        (folder / side).mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(side_images):
            Image.fromarray(image).save(folder / side / f"{index:05d}.png", format="PNG")
    rows = [f"{index:05d},{number}" for index, number in enumerate(numbers)]
    (folder / "numbers.csv").write_text("pair,number\n" + "\n".join(rows) + "\n")
    (folder / "README.txt").write_text(LICENCE_NOTE)
    return folder
