"""Image files read with Pillow and NumPy as the triplet script's TensorFlow reading reads them.

Under JAX and PyTorch there is no `tf.io.decode_image` or `tf.image.resize`. This module
gives the same pixels without TensorFlow: RGB, uint8 decoded, then float32 0-255 resized
bilinearly with half-pixel centres and no antialiasing, which is what `tf.image.resize`
does by default. Pillow's own `resize` antialiases when it shrinks an image, so the resize
is written here in NumPy. PNG, GIF and BMP files give TensorFlow's pixels exactly; a JPEG
may differ by a few levels where its colours change fast: TensorFlow's decoder uses
libjpeg's fast integer inverse DCT, Pillow the accurate one (measured in the tests).
"""

import io

import numpy as np

# What a file that Pillow cannot read is called in the one-line messages.
UNREADABLE = "not a JPEG, PNG, GIF or BMP image Pillow can decode"


def decode_image(image_bytes):
    """Decode JPEG, PNG, GIF or BMP bytes to a uint8 RGB array (height, width, 3).

    As `tf.io.decode_image(channels=3, dtype=uint8, expand_animations=False)`: grey and
    palette images get three channels, an alpha channel is dropped (not blended), 16-bit
    images keep their top 8 bits, an animated GIF gives its first frame. A file Pillow
    cannot decode, or a truncated one, is a `ValueError`.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.load()  # decodes now: a damaged file fails here, not later
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit grey: TensorFlow keeps the high byte (a conversion to uint8).
                grey = (np.asarray(image, np.uint32) >> 8).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            return np.asarray(image.convert("RGB"), np.uint8)
    except UnidentifiedImageError:
        raise ValueError(UNREADABLE) from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(str(error) or UNREADABLE) from None


def _bilinear_positions(input_size, output_size):
    """For each output row (or column): the two input rows it reads and the weight of the second.

    TensorFlow's rule with half-pixel centres: output pixel i samples the input at
    `(i + 0.5) * input_size / output_size - 0.5`, clamped to the image, in float32.
    """
    scale = np.float32(input_size / output_size)
    position = (np.arange(output_size, dtype=np.float32) + np.float32(0.5)) * scale
    position -= np.float32(0.5)
    floor = np.floor(position)
    low = np.clip(floor, 0, input_size - 1).astype(np.int64)
    high = np.clip(np.ceil(position), 0, input_size - 1).astype(np.int64)
    return low, high, (position - floor).astype(np.float32)


def resize_bilinear(image, size):
    """`image` (height, width, channels) resized to `size` as float32, as `tf.image.resize`.

    Bilinear, half-pixel centres, no antialiasing, the same float32 arithmetic in the same
    order: the same values as TensorFlow (0 difference measured on random images).
    """
    image = np.asarray(image, np.float32)
    top, bottom, row_weight = _bilinear_positions(image.shape[0], size[0])
    left, right, column_weight = _bilinear_positions(image.shape[1], size[1])
    column_weight = column_weight[None, :, None]
    upper = image[top][:, left] + (image[top][:, right] - image[top][:, left]) * column_weight
    lower = image[bottom][:, left]
    lower = lower + (image[bottom][:, right] - lower) * column_weight
    return upper + (lower - upper) * row_weight[:, None, None]


def read_image(path, size):
    """An image file as float32 RGB values 0-255 at `size`: `decode_image`, `resize_bilinear`."""
    with open(path, "rb") as stream:
        image_bytes = stream.read()
    return resize_bilinear(decode_image(image_bytes), size)
