"""The triplet script reads images the same way with TensorFlow and without it.

Under TensorFlow, `preprocess_image` is the tutorial's `tf.io.decode_image` and
`tf.image.resize`; under JAX and PyTorch, Pillow decodes and NumPy resizes
(`siamese_support.pillow_images`). These tests measure the largest difference between the
two readings on real files written by Pillow: PNG, GIF and BMP files read identically; a
JPEG differs by a few levels of 255 at most, because TensorFlow's decoder uses libjpeg's fast
integer inverse DCT and Pillow the accurate one (TensorFlow's `dct_method="INTEGER_ACCURATE"`
gives Pillow's pixels exactly). Measured here: at most 8 levels on random noise, the worst
case, and about 1 level on average; the figures are printed (`pytest -s`).
"""

import numpy as np
import pytest
from helpers import FIXTURE
from PIL import Image

import triplet_totally_looks_like as tll
from siamese_support import pillow_images, synthetic

# Shrinking, enlarging and odd shapes: the resize's three cases.
SIZES = [(64, 64), (200, 200), (37, 53)]


def test_resize_of_a_tiny_image_by_hand():
    # Half-pixel centres: output pixel i samples the input at (i + 0.5) * 2 / 4 - 0.5, that
    # is -0.25, 0.25, 0.75, 1.25, clamped to the image: 0, 0.25, 0.75, 1 of the way.
    image = np.array([[0.0, 4.0], [8.0, 12.0]], np.float32)[:, :, None]
    resized = pillow_images.resize_bilinear(image, (4, 4))[:, :, 0]
    np.testing.assert_allclose(resized[0], [0, 1, 3, 4])
    np.testing.assert_allclose(resized[:, 0], [0, 2, 6, 8])
    np.testing.assert_allclose(resized[3], [8, 9, 11, 12])
    # The same size gives the image back; a constant image stays constant.
    np.testing.assert_array_equal(pillow_images.resize_bilinear(image, (2, 2)), image)
    flat = pillow_images.resize_bilinear(np.full((5, 7, 3), 9.0), (3, 11))
    np.testing.assert_array_equal(flat, np.full((3, 11, 3), 9.0, np.float32))


def test_decoding_refuses_what_is_not_an_image():
    with pytest.raises(ValueError, match="not a JPEG, PNG, GIF or BMP image"):
        pillow_images.decode_image(b"not an image")


def _tensorflow_reading():
    """The script's `preprocess_image` when it is TensorFlow's; the test is skipped otherwise."""
    if tll.keras.backend.backend() != "tensorflow":
        pytest.skip("compares against TensorFlow's reading: needs KERAS_BACKEND=tensorflow")
    return tll.preprocess_image


def test_resize_equals_tensorflow_exactly():
    _tensorflow_reading()
    tf = tll.tf
    rng = np.random.default_rng(0)
    for shape in [(96, 96), (37, 53), (200, 150), (5, 301)]:
        image = rng.integers(0, 256, (*shape, 3)).astype(np.float32)
        for size in SIZES:
            expected = tf.image.resize(image, size).numpy()
            np.testing.assert_array_equal(pillow_images.resize_bilinear(image, size), expected)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Real files by Pillow: the dry run's generated scenes (JPEG, as `synthetic` writes
    them), the same scenes as PNG, MNIST digits as grey JPEG and PNG, random noise as JPEG,
    PNG, GIF and BMP. Returns `{format: [paths]}`."""
    folder = tmp_path_factory.mktemp("pixels")
    synthetic.make_synthetic_dataset(folder / "scenes", pairs=6, image_size=96, seed=5)
    files = {"JPEG": sorted((folder / "scenes" / "left").iterdir())}
    files["PNG"], files["GIF"], files["BMP"] = [], [], []
    for index, path in enumerate(files["JPEG"][:3]):
        with Image.open(path) as scene:
            scene.save(folder / f"scene{index}.png")
        files["PNG"].append(folder / f"scene{index}.png")
    with np.load(FIXTURE) as mnist:
        digits = mnist["x_test"][:4]
    for index, digit in enumerate(digits):
        Image.fromarray(digit).save(folder / f"digit{index}.jpg", quality=90)
        Image.fromarray(digit).save(folder / f"digit{index}.png")
        files["JPEG"].append(folder / f"digit{index}.jpg")
        files["PNG"].append(folder / f"digit{index}.png")
    noise = np.random.default_rng(1).integers(0, 256, (50, 70, 3)).astype(np.uint8)
    for name, options in (("JPEG", {"quality": 95}), ("PNG", {}), ("GIF", {}), ("BMP", {})):
        path = folder / f"noise.{name.lower()}"
        Image.fromarray(noise).save(path, format=name, **options)
        files[name].append(path)
    return files


def test_pillow_and_numpy_read_as_tensorflow_reads(image_files):
    preprocess_image = _tensorflow_reading()
    differences = {}
    for name, paths in image_files.items():
        largest, total, count = 0.0, 0.0, 0
        for path in paths:
            for size in SIZES:
                expected = preprocess_image(str(path), size).numpy()
                pixels = pillow_images.read_image(path, size)
                assert pixels.dtype == np.float32 and pixels.shape == expected.shape
                difference = np.abs(pixels - expected)
                largest = max(largest, float(difference.max()))
                total, count = total + float(difference.sum()), count + difference.size
        differences[name] = (largest, total / count)
        print(f"{name}: largest difference {largest:.4f}, mean {total / count:.4f} (of 255)")
    for name in ("PNG", "GIF", "BMP"):
        assert differences[name] == (0.0, 0.0), (name, differences[name])
    largest, mean = differences["JPEG"]
    assert 0 < largest <= 10 and mean <= 1.5, differences["JPEG"]
