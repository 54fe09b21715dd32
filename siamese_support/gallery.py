"""A folder of images searched by embedding distance, its embeddings kept between searches.

`triplet_totally_looks_like.py search` embeds every image of a folder (the gallery) with a
trained run's model and ranks them by squared distance to a query, the distance the
triplet loss trained. Embedding a large gallery takes minutes on a CPU, so the embeddings
are kept in the run folder, one cache file per gallery folder, and reused for every file
whose name, size and modification time are unchanged, while the model file is unchanged.
"""

import hashlib
import os
import pathlib
import time

import keras
import numpy as np

from siamese_support import command_line, evaluation, image_folders, plots, run_folder, stores
from siamese_support.devices import stderr_silenced
from siamese_support.trained_model import find_model, load_embedding_model, read_metrics

SCRIPT = "triplet_totally_looks_like.py"
CACHE_FOLDER = "gallery-cache"


def list_gallery(folder):
    """The image files of `folder` and its sub-folders, sorted; hidden folders are skipped."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--gallery {folder}: no such folder")
    files = []
    for root, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        files += [pathlib.Path(root) / name for name in sorted(names)]
    files = [file for file in files if image_folders.is_image_file(file)]
    if not files:
        extensions = ", ".join(image_folders.IMAGE_EXTENSIONS)
        raise ValueError(f"--gallery {folder} holds no images ({extensions})")
    return files


def cache_path(run_dir, folder):
    """The cache file of the gallery `folder` in `run_dir`: one per folder, by its full path."""
    key = hashlib.sha256(str(pathlib.Path(folder).resolve()).encode()).hexdigest()[:16]
    return pathlib.Path(run_dir) / CACHE_FOLDER / f"{key}.npz"


def file_key(path):
    """What identifies a file's content without reading it: size and modification time (ns)."""
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns


def read_cache(path, model_key, image_size):
    """`{(relative path, size, mtime): embedding}` from a cache file made by the same model.

    A missing, damaged or outdated cache (another model file or image size) gives `{}`.
    """
    try:
        with np.load(path, allow_pickle=False) as cache:
            if list(cache["model_key"]) != list(model_key):
                return {}
            if list(cache["image_size"]) != list(image_size):
                return {}
            keys = zip(cache["paths"], cache["sizes"], cache["mtimes"], strict=True)
            return {
                (str(name), int(size), int(mtime)): row
                for (name, size, mtime), row in zip(keys, cache["embeddings"], strict=True)
            }
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_cache(path, entries, model_key, image_size):
    """Write the cache atomically; a run folder that cannot be written only costs a warning."""
    names, sizes, mtimes = zip(*[key for key, _ in entries], strict=True)
    try:
        path.parent.mkdir(exist_ok=True)
        with run_folder.atomic_path(path) as temporary:
            np.savez(
                temporary,
                paths=np.array(names, dtype=str),
                sizes=np.array(sizes, np.int64),
                mtimes=np.array(mtimes, np.int64),
                embeddings=np.stack([row for _, row in entries]).astype(np.float32),
                model_key=np.array(model_key, np.int64),
                image_size=np.array(image_size, np.int64),
            )
    except OSError as error:
        print(
            f"warning: the gallery's embeddings could not be kept in {path} "
            f"({error.strerror or error}); the next search embeds the gallery again",
            flush=True,
        )


def gallery_embeddings(folder, files, cache_file, model_key, image_size, embed, readable):
    """The embedding of every file of the gallery, from the cache where it is still valid.

    `embed(files)` embeds a list of files; `readable(files)` returns the ones the
    training's decoder can read (the others are skipped with a warning). Returns
    `(files, embeddings)` for the readable files, in order, and rewrites the cache when
    anything was embedded or dropped.
    """
    started = time.perf_counter()
    cached = read_cache(cache_file, model_key, image_size)
    cached_count = len(cached)
    keys = [(file.relative_to(folder).as_posix(), *file_key(file)) for file in files]
    missing = [file for file, key in zip(files, keys, strict=True) if key not in cached]
    skipped = []
    if missing:
        usable = set(readable(missing))
        skipped = [file for file in missing if file not in usable]
        if skipped:
            print(
                f"warning: skipped {len(skipped)} file(s) of the gallery that cannot be "
                f"decoded as images (first: {skipped[0]})",
                flush=True,
            )
        fresh = [file for file in missing if file in usable]
        if fresh:
            rows = embed([str(file) for file in fresh])
            # The keys read before embedding: a file changed meanwhile is embedded next time.
            key_of = dict(zip(files, keys, strict=True))
            for file, row in zip(fresh, rows, strict=True):
                cached[key_of[file]] = row
    entries = [(key, cached[key]) for key in keys if key in cached]
    if not entries:
        raise ValueError(f"--gallery {folder} holds no image that can be decoded")
    embedded = len(missing) - len(skipped)
    print(
        f"Gallery {folder}: {len(entries):,} images, {embedded:,} embedded and "
        f"{len(entries) - embedded:,} from the cache in {time.perf_counter() - started:.2f} s",
        flush=True,
    )
    if embedded or len(entries) != cached_count:  # new files, or files gone
        write_cache(cache_file, entries, model_key, image_size)
    kept = {key for key, _ in entries}
    return (
        [file for file, key in zip(files, keys, strict=True) if key in kept],
        np.stack([row for _, row in entries]),
    )


def readable_files(files, decode_image):
    """The files among `files` that `decode_image`, the training's decoder, can read."""
    unreadable = image_folders.find_unreadable_images([str(file) for file in files], decode_image)
    return [file for file in files if str(file) not in unreadable]


def read_image(path, load_image):
    """One image file through the training's loader, as a 0-255 float array (ValueError).

    The loader is TensorFlow's under TensorFlow, Pillow and NumPy's under JAX and PyTorch.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such image file")
    try:
        with stderr_silenced():  # the JPEG library's own complaint; the error says it
            return np.asarray(load_image(str(path)))
    except image_folders.decoding_errors() as error:
        reason = image_folders._decode_error_reason(error)
        raise ValueError(f"{path}: not an image the training could read ({reason})") from None


def load_run_model(run_dir):
    """The triplet run's embedding model and its model file's key (size, mtime)."""
    model_path = find_model(run_dir, SCRIPT)
    model = load_embedding_model(model_path, SCRIPT, expected_rank=3, expected_channels=3)
    return model, file_key(model_path)


def embed(model, images):
    """Embeddings of a batch of 0-255 images, as float64 rows."""
    embeddings = model(np.stack(images), training=False)
    return np.asarray(keras.ops.convert_to_numpy(embeddings), np.float64)


def compare_images(images, run_dir, preprocess_image):
    """`triplet_totally_looks_like.py compare`: squared distance and cosine similarity.

    `preprocess_image(filename, image_size)` is the training's loader. Returns the exit code.
    """
    with command_line.one_line_errors(f"{SCRIPT} compare") as status:
        model, _ = load_run_model(run_dir)
        size = tuple(model.input_shape[1:3])
        pixels = [read_image(path, lambda name: preprocess_image(name, size)) for path in images]
        first, second = embed(model, pixels)
        distance = float(np.sum((first - second) ** 2))
        similarity = float(evaluation.cosine_similarities(first[None], second[None])[0])
        print(f"Run: {run_dir}")
        print(f"Squared distance: {distance:.4f}")
        print(f"Cosine similarity: {similarity:+.4f}")
        try:
            metrics = read_metrics(run_dir)
            print(
                "On its validation pairs, an anchor's mean cosine similarity was "
                f"{metrics['positive_similarity']:+.4f} to its positive and "
                f"{metrics['negative_similarity']:+.4f} to a negative"
            )
        except (ValueError, KeyError, TypeError):
            pass
    return status.code


def search_gallery(query, folder, k, run_dir, output, batch_size, preprocess_image, decode_image):
    """`triplet_totally_looks_like.py search`: the `k` gallery images nearest to `query`.

    `preprocess_image` (a file name and an image size) and `decode_image` are the
    training's loader and decoder. Prints the ranking (squared distance, cosine
    similarity), draws it in the PNG `output` (default: the run folder's `search.png`).
    Returns the exit code.
    """
    with command_line.one_line_errors(f"{SCRIPT} search") as status:
        if output is not None:  # its folder is made before the work, as run folders are
            run_folder.make_parent_folder(output, "--output")
        output = pathlib.Path(output or pathlib.Path(run_dir) / "search.png")
        files = list_gallery(folder)
        if k > len(files):
            raise ValueError(f"-k {k} is more than the {len(files)} images in --gallery {folder}")
        model, model_key = load_run_model(run_dir)
        size = tuple(model.input_shape[1:3])

        def load_image(name):
            return preprocess_image(name, size)

        query_pixels = read_image(query, load_image)
        files, embeddings = gallery_embeddings(
            pathlib.Path(folder),
            files,
            cache_path(run_dir, folder),
            model_key,
            size,
            lambda names: stores.embed_image_files(
                model, names, load_image, batch_size, "Embedding the gallery"
            ),
            lambda names: readable_files(names, decode_image),
        )
        if k > len(files):
            raise ValueError(f"-k {k} is more than the {len(files)} readable images of the gallery")
        query_embedding = embed(model, [query_pixels])
        distances = evaluation.pairwise_squared_distances(query_embedding, embeddings)[0]
        nearest = np.argsort(distances, kind="stable")[:k]
        similarities = evaluation.cosine_similarities(
            np.repeat(query_embedding, k, axis=0), embeddings[nearest]
        )
        print(f"The {k} images nearest to {query} (squared distance, cosine similarity):")
        for rank, (index, similarity) in enumerate(zip(nearest, similarities, strict=True), 1):
            print(f"{rank:>4}. {distances[index]:12.4f}  {similarity:+.4f}  {files[index]}")
        images = [read_image(files[index], load_image) for index in nearest]
        titles = [
            f"{files[index].relative_to(folder)}\nd2 {distances[index]:.3f}, cos {similarity:+.3f}"
            for index, similarity in zip(nearest, similarities, strict=True)
        ]
        plots.plot_search_results(query_pixels, f"query: {query.name}", images, titles, output)
        print(f"Wrote {output}")
    return status.code


def run_command(args, script, preprocess_image, decode_image):
    """Run `compare`, `search` or `export` of the triplet script; return the exit code.

    `args` is the parsed subcommand (argparse's namespace): which options it holds depends
    on the subcommand, which is why this takes it whole. `script` is the script's path.
    """
    if args.command == "compare":
        return compare_images(args.images, args.run_dir, preprocess_image)
    if args.command == "search":
        inputs = (args.query, args.gallery, args.k, args.run_dir, args.output, args.batch_size)
        return search_gallery(*inputs, preprocess_image, decode_image)
    from siamese_support import export  # imports the modules this one does

    return export.export_run(args.run_dir, args.format, args.output, args.overwrite, script)
