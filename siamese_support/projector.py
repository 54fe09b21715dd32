"""TensorBoard's embedding projector files for the triplet run's validation images.

The tutorial prints two cosine similarities; TensorBoard's projector lets a reader browse
every validation embedding in 3-D (PCA, t-SNE or UMAP, computed in the browser), with each
image's thumbnail and name. The projector reads the vectors from a TSV file named in its
`projector_config.pbtxt`, so writing them needs neither TensorFlow nor a checkpoint:
these files are written under any backend.
"""

import math
import pathlib

import numpy as np

from siamese_support import run_folder

# The files, in the folder of the validation curves (`logs/validation/`): TensorBoard finds
# the configuration in any folder of event files under its --logdir, or in --logdir itself.
CONFIG_FILE, *_ = run_folder.PROJECTOR_FILES
# TensorBoard draws sprites of at most 8192 x 8192 pixels.
LARGEST_SPRITE = 8192


def thumbnail_size(count, largest=64):
    """The side of each of `count` square thumbnails, so that their grid fits a sprite."""
    columns = max(1, math.ceil(math.sqrt(count)))
    return max(1, min(largest, LARGEST_SPRITE // columns))


def sprite(images, size):
    """One uint8 RGB image holding `images` (0-255 arrays) as `size` x `size` thumbnails,
    row by row on a square grid, as TensorBoard's projector reads a sprite."""
    from PIL import Image

    columns = max(1, math.ceil(math.sqrt(len(images))))
    sheet = Image.new("RGB", (columns * size, columns * size), "white")
    for index, image in enumerate(images):
        pixels = np.clip(np.asarray(image, np.float32), 0, 255).astype(np.uint8)
        tile = Image.fromarray(pixels).convert("RGB").resize((size, size), Image.BILINEAR)
        sheet.paste(tile, ((index % columns) * size, (index // columns) * size))
    return sheet


def config_text(thumbnail=None):
    """The projector's configuration (protocol buffer text), paths relative to its folder."""
    lines = [
        "embeddings {",
        '  tensor_name: "validation embeddings"',
        '  tensor_path: "embeddings.tsv"',
        '  metadata_path: "metadata.tsv"',
    ]
    if thumbnail:
        lines += ["  sprite {", '    image_path: "sprite.png"']
        lines += [f"    single_image_dim: {thumbnail}", f"    single_image_dim: {thumbnail}"]
        lines.append("  }")
    return "\n".join(lines + ["}"]) + "\n"


def write_projector_files(folder, embeddings, anchor_images, positive_images, load_image=None):
    """Write the projector's files for the validation pairs into `folder`.

    `embeddings` holds the anchors' rows, then the positives' (`evaluate_triplets`' order);
    the metadata names each image's file, its side (`left`, the anchors; `right`) and its
    pair. With `load_image` (a file name to 0-255 pixels), a sprite of thumbnails too.
    Each file is written under a temporary name and renamed into place.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = list(anchor_images) + list(positive_images)
    embeddings = np.asarray(embeddings, np.float32)
    if len(embeddings) != len(files):
        raise ValueError(f"{len(embeddings)} embeddings for {len(files)} images")
    with run_folder.atomic_path(folder / "embeddings.tsv") as temporary:
        np.savetxt(temporary, embeddings, fmt="%.7g", delimiter="\t")
    pair_count = len(anchor_images)
    rows = ["image\tside\tpair"]  # a header row: the projector reads one with two columns+
    for index, name in enumerate(files):
        side = "left" if index < pair_count else "right"
        rows.append(f"{pathlib.Path(name).name}\t{side}\t{index % pair_count}")
    with run_folder.atomic_path(folder / "metadata.tsv") as temporary:
        pathlib.Path(temporary).write_text("\n".join(rows) + "\n")
    size = None
    if load_image is not None and files:
        size = thumbnail_size(len(files))
        with run_folder.atomic_path(folder / "sprite.png") as temporary:
            sprite([load_image(name) for name in files], size).save(temporary, format="PNG")
    with run_folder.atomic_path(folder / CONFIG_FILE) as temporary:
        pathlib.Path(temporary).write_text(config_text(size))
