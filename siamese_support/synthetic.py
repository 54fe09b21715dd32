"""Generated image pairs in the Totally Looks Like layout, for offline runs and tests.

Without a network there is no dataset; `--dry-run`, the tests and the benchmarks train on
generated scenes instead. The generator is not part of the tutorial, so it lives here.
"""

import pathlib

import numpy as np

# How much the two generated images of a pair differ: enough that a randomly initialised
# network does not already match them all (measured: see the README).
synthetic_jitter = 2.0


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


def random_scene(rng):
    """A scene to draw: a background colour and two to four shapes (kind, centre, size,
    colour), from the NumPy generator `rng`."""
    shape_count = int(rng.integers(2, 5))
    return {
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


def generated_images(count, image_size, seed=0):
    """`count` generated scenes, each drawn once, as uint8 RGB images `(count, size, size, 3)`."""
    rng = np.random.default_rng(seed)
    images = [
        _draw_scene(random_scene(rng), image_size, rng, synthetic_jitter) for _ in range(count)
    ]
    return np.stack(images)


def make_synthetic_dataset(folder, pairs=48, image_size=96, seed=42, jitter=synthetic_jitter):
    """Write a Totally-Looks-Like-style folder of generated pairs; return the folder.

    Each pair is one random scene (a background colour and two to four coloured shapes),
    drawn twice with independent perturbations of positions, sizes, colours and noise:
    `left/NNNNN.jpg` and `right/NNNNN.jpg` look alike, other pairs do not. `jitter` scales
    the perturbations (0 draws the same image twice). Pillow writes the JPEGs, with the
    settings of the `tf.io.encode_jpeg` that wrote them before (quality 92, 4:2:0 chroma),
    whose files decode to the same pixels.
    """
    from PIL import Image

    if pairs < 1:
        raise ValueError(f"pairs must be positive, got {pairs}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    folder = pathlib.Path(folder)
    rng = np.random.default_rng(seed)
    for side in ("left", "right"):
        (folder / side).mkdir(parents=True, exist_ok=True)
    for index in range(pairs):
        scene = random_scene(rng)
        for side in ("left", "right"):
            image = _draw_scene(scene, image_size, rng, jitter)
            path = folder / side / f"{index:05d}.jpg"
            Image.fromarray(image).save(path, format="JPEG", quality=92, subsampling="4:2:0")
    return folder
