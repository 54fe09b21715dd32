"""Using what a run trained: its model found and loaded, new images read as training read them.

The tutorials stop when training stops. Their readers' next questions (keras #7119 and
#14914, keras-io #429 and #926) are how to keep and reload the embedding network, how to
read a new image the way the training data was read, and which distance means "same". The
scripts' `compare` and `search` commands answer them with what is here and in `gallery`.
"""

import csv
import json
import os
import pathlib
import zipfile

import numpy as np

from siamese_support import command_line, run_folder

# The embedding model each script saves in its run folder, under a name of its own.
MODEL_FILES = {
    "mnist_siamese.py": "embedding_network.keras",
    "triplet_totally_looks_like.py": "embedding.keras",
}


def find_model(run_dir, script):
    """The path of `script`'s embedding model in the run folder `run_dir`.

    Raises `ValueError` saying what is wrong and what to do: no such folder (naming the dry
    run's folder beside it, `<run_dir>_dry_run`, when that one exists), a run that has not
    finished, a run folder of the other script, or no model at all.
    """
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        hint = f"python {script}"
        dry_run_dir = run_dir.with_name(f"{run_dir.name}_dry_run")
        if dry_run_dir.is_dir():
            hint += f"; a --dry-run's model is in {dry_run_dir}: pass --run-dir {dry_run_dir}"
        raise ValueError(f"no run folder {run_dir}: train a model first ({hint})")
    model_path = run_dir / MODEL_FILES[script]
    if model_path.is_file():
        return model_path
    for other, name in MODEL_FILES.items():
        if other != script and (run_dir / name).is_file():
            raise ValueError(
                f"{run_dir} holds a model of {other} ({name}), not of {script}: use "
                f"python {other} with it"
            )
    if run_folder.resumable(run_dir):
        raise ValueError(
            f"the run in {run_dir} has not finished, so it has no {model_path.name} yet: "
            f"finish it with python {script} --output-dir {run_dir} --resume"
        )
    raise ValueError(f"{run_dir} holds no {model_path.name}: it is not a run folder of {script}")


def read_metrics(run_dir):
    """The finished run's `metrics.json` as a dictionary (ValueError if missing or damaged)."""
    path = pathlib.Path(run_dir) / "metrics.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{run_dir} has no metrics.json: its run has not finished") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} cannot be read ({command_line.one_line(error)})") from None


def whole_zip_file(path):
    """Whether `path` is a zip archive whose every member reads back intact (CRC checked)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


def load_embedding_model(path, script, expected_rank, expected_channels=None):
    """Load a saved embedding model in Keras's safe mode and check what it takes.

    `expected_rank` counts the input's dimensions after the batch (2 for MNIST's 28 x 28,
    3 for an RGB image); `expected_channels`, when given, the last one. A model that
    takes something else came from the other script, or from elsewhere.
    """
    import keras

    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # a damaged file raises many kinds: say which file, in one line
        problem = command_line.one_line(error)
        # Keras says "File not found" for a .keras file cut short (a copy or a save that
        # did not finish): it is there, but not a whole zip archive.
        if os.path.isfile(path) and not whole_zip_file(path):
            problem = "the file is damaged or incomplete: not a whole .keras zip archive"
        raise ValueError(f"{path} cannot be loaded as a Keras model ({problem})") from None
    shape = tuple(model.input_shape[1:])
    if len(shape) != expected_rank or (expected_channels and shape[-1] != expected_channels):
        raise ValueError(
            f"{path} takes inputs of shape {shape}, not the images of {script}: it is a "
            "model of another script"
        )
    return model


def read_digit(path, size=(28, 28)):
    """An image file as MNIST training saw its digits: grey, `size`, a light digit on dark.

    Any size, colour or grey, PNG, JPEG, BMP or GIF (its first frame). A transparent
    ground counts as white. An image whose border is mostly light is taken to be a dark
    digit on a light ground (ink on paper) and inverted. Returns `(pixels, inverted)`:
    uint8 pixels of shape `size`, and whether the image was inverted. The whole image is
    resized; it is not cropped or centred as MNIST's digits were, so a digit should fill
    most of its image, with a small margin.
    """
    from PIL import Image

    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            image.seek(0)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                ground = Image.new("RGBA", image.size, "white")
                image = Image.alpha_composite(ground, image.convert("RGBA"))
            grey = image.convert("L")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        reason = command_line.one_line(error)
        raise ValueError(f"{path}: not an image this script can read ({reason})") from None
    pixels = np.asarray(grey)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    inverted = bool(border.mean() > 127.5)
    if inverted:
        grey = Image.fromarray(255 - pixels)
    height, width = size
    grey = grey.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(grey, np.uint8), inverted


def read_pairs_file(path):
    """The rows of a CSV of image pairs: two paths a row, relative to the CSV's folder.

    Blank rows are skipped, and so is a first row in which no cell ends in an image
    extension (a header such as `image_a,image_b`).
    """
    from siamese_support.image_folders import IMAGE_EXTENSIONS

    path = pathlib.Path(path)
    try:
        with open(path, newline="") as stream:
            rows = [row for row in csv.reader(stream) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(
            f"--pairs {path} cannot be read ({command_line.one_line(error)})"
        ) from None
    folder = path.parent
    pairs = []
    for number, row in enumerate(rows, start=1):
        cells = [cell.strip() for cell in row]
        if len(cells) != 2 or not all(cells):
            raise ValueError(f"--pairs {path} row {number}: expected two image paths, got {row}")
        files = [folder / cell for cell in cells]
        if number == 1 and not any(file.suffix.lower() in IMAGE_EXTENSIONS for file in files):
            continue  # a header
        pairs.append((number, *files))
    if not pairs:
        raise ValueError(f"--pairs {path} holds no pairs of images")
    return pairs


def compare_digits(images, pairs_file, run_dir, output, distance, example_threshold):
    """`mnist_siamese.py compare`: the distance of two digit images, or of many pairs.

    `images` holds two image paths, or `pairs_file` a CSV of pairs (`read_pairs_file`),
    whose distances and verdicts go to the CSV `output` (default: the run folder's
    `compared-pairs.csv`). `distance` is the script's Euclidean distance; a pair is called
    the same digit below the run's `best_threshold` and, as in the example, below
    `example_threshold`. Returns the exit code.
    """
    from siamese_support import evaluation

    with command_line.one_line_errors("mnist_siamese.py compare") as status:
        model_path = find_model(run_dir, "mnist_siamese.py")
        threshold = read_metrics(run_dir).get("best_threshold")
        if not isinstance(threshold, (int, float)):
            raise ValueError(f"{run_dir}/metrics.json has no best_threshold")
        if pairs_file is not None:
            rows = read_pairs_file(pairs_file)
            if output is not None:  # its folder is made before the work, as run folders are
                run_folder.make_parent_folder(output, "--output")
            output = pathlib.Path(output or pathlib.Path(run_dir) / "compared-pairs.csv")
        else:
            rows = [(1, *map(pathlib.Path, images))]
        model = load_embedding_model(model_path, "mnist_siamese.py", expected_rank=2)
        files = sorted({file for _, *pair in rows for file in pair})
        digits, inverted = [], []
        for file in files:
            pixels, was_inverted = read_digit(file, model.input_shape[1:3])
            digits.append(pixels)
            if was_inverted:
                inverted.append(file)
        position = {file: index for index, file in enumerate(files)}
        pairs = np.array([[position[a], position[b]] for _, a, b in rows], np.int32)
        distances = evaluation.embedded_pair_distances(model, distance, np.stack(digits), pairs)
        print(f"Run: {run_dir} (best threshold {threshold:.4f}, chosen on its training pairs)")
        if pairs_file is None:
            for file in inverted:
                print(
                    f"{file}: a dark digit on a light ground; inverted, as MNIST is light on dark"
                )
            print(f"Distance: {distances[0]:.4f}")
            for name, value in (
                ("the run's best", threshold),
                ("the example's", example_threshold),
            ):
                verdict = "same digit" if distances[0] < value else "different digits"
                print(f"At {name} threshold {value:.4g}: {verdict}")
            return status.code
        example_column = f"same_digit_at_{example_threshold:g}"
        table = [
            {
                "image_a": str(a),
                "image_b": str(b),
                "distance": f"{value:.6g}",
                "same_digit": int(value < threshold),
                example_column: int(value < example_threshold),
            }
            for (_, a, b), value in zip(rows, distances, strict=True)
        ]
        run_folder.write_csv(table, output)
        same = int(np.sum(distances < threshold))
        if inverted:
            print(f"{len(inverted)} of {len(files)} images were dark on light: inverted")
        print(f"{len(rows)} pairs compared, {same} called the same digit; wrote {output}")
    return status.code


def run_command(args, script, distance, example_threshold):
    """Run `compare` or `export` of the MNIST script; return the exit code.

    `args` is the parsed subcommand (argparse's namespace): which options it holds depends
    on the subcommand, which is why this takes it whole. `script` is the script's path.
    """
    if args.command == "compare":
        inputs = (args.images, args.pairs, args.run_dir, args.output, distance)
        return compare_digits(*inputs, example_threshold)
    from siamese_support import export  # imports this module

    return export.export_run(args.run_dir, args.format, args.output, args.overwrite, script)
