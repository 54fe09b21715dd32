"""Decoded images and frozen-trunk features, computed once per run and read by index.

The tutorial decodes the three images of every triplet in every epoch and runs all of
ResNet50 at every step. Computing each image's pixels, or its frozen trunk's features, once
and gathering rows by index gives the same numbers for a fraction of the work; the
machinery for it (memory budgets, disk-backed arrays, `tf.data` gathers) lives here.

Under TensorFlow, `tf.data` pipelines decode the images and gather the rows. Under JAX and
PyTorch, threads decode them (the script's loader, Pillow and NumPy) and the model runs
batch by batch; TensorFlow is imported only by the functions of its path, so that this
module works where it is not installed.
"""

import concurrent.futures
import functools
import os
import tempfile
import time
import weakref

import keras
import numpy as np

from siamese_support.devices import keras_backend, without_autotuning
from siamese_support.progress import Progress, predict_progress

# A store larger than this share of the available memory, or than this many bytes, goes to
# a file on disk (`DiskStore`). At the dataset's full size the frozen trunk's features of the
# training images take 3.9 GB: on disk, the run's peak memory fell from 8.2 to 4.7 GB (see
# docs/performance.md), with the same numbers, where half precision moved the losses.
memory_share_for_stores = 0.5
largest_store_in_memory = 2e9
# Rows that a PyTorch model reads at once in `predict_rows`. ResNet50's frozen trunk, 200 x 200,
# peaked at 1.3 / 1.8 / 2.7 / 4.6 GB reading 4 / 8 / 16 / 32 rows, at 69 / 61 / 59 / 85 ms an
# image (benchmarks/trunk_pass.py, docs/performance.md).
torch_rows_at_once = 8
# Batches of images waiting for the model that reads them. With tf.data's autotuning, the
# decoded batches (15 MB each at 200 x 200) piled up ahead of the slow trunk: 5-6 GB before
# it had read a few hundred images. Two keep the model fed: decoding is the quick part.
prefetched_batches = 2


def available_memory():
    """Bytes of memory available to this process without swapping (psutil, every OS)."""
    import psutil

    return psutil.virtual_memory().available


def new_store(shape, dtype, folder=None, memory_budget=None):
    """An uninitialised array for cached images or features: in memory if it fits.

    It fits when it takes at most `memory_budget` bytes (default: half the available memory,
    and at most `largest_store_in_memory`). Otherwise it is a `DiskStore` in `folder`.
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if memory_budget is None:
        memory_budget = min(available_memory() * memory_share_for_stores, largest_store_in_memory)
    if size <= memory_budget:
        return np.empty(shape, dtype)
    if folder is None:
        raise ValueError(
            f"a cache of {size / 1e9:.1f} GB does not fit in memory and no folder was given"
        )
    return DiskStore(folder, shape, dtype)


class DiskStore:
    """An array in a `.npy` file, written and read a batch of rows at a time.

    Each access maps the file, copies its rows and unmaps it again, so the process holds a
    batch, not the array: the operating system keeps the file's pages in its cache while
    memory is free, and reads them from disk again when it is not. (A mapping kept open
    would count every page the training has touched, all of them after an epoch, in the
    process's memory.) Indexing takes what a NumPy array takes and returns a copy.
    """

    def __init__(self, folder, shape, dtype):
        handle, self.path = tempfile.mkstemp(dir=folder, prefix="store-", suffix=".npy")
        os.close(handle)
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        print(f"Caching {self.nbytes / 1e9:.1f} GB on disk in {self.path}", flush=True)
        # The header, and a file of the full size (mapped only while it is made).
        np.lib.format.open_memmap(self.path, "w+", self.dtype, self.shape).flush()
        # A mapped file is sparse until written: on a full disk, writing a row would kill the
        # process with SIGBUS. Reserving its blocks now turns that into an OSError here.
        if hasattr(os, "posix_fallocate"):
            with open(self.path, "r+b") as stream:
                try:
                    os.posix_fallocate(stream.fileno(), 0, os.path.getsize(self.path))
                except OSError as error:
                    os.remove(self.path)
                    raise OSError(error.errno, error.strerror, self.path) from None

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        return np.array(np.load(self.path, mmap_mode="r")[rows])

    def __setitem__(self, rows, values):
        array = np.load(self.path, mmap_mode="r+")
        array[rows] = values
        array.flush()


def split_at_layer(model, base_name, cut_name):
    """`(trunk, tail)` with `tail(trunk(x)) == model(x)`, cut inside a nested model.

    `model` is functional: an input, the layers that prepare it, the nested functional
    model `base_name`, then the layers after it. The trunk runs from the input to the
    output of `cut_name`, a layer of the nested model; the tail holds the rest. Both share
    the model's layers and weights: with everything before `cut_name` frozen, the trunk's
    output can be computed once per image and stored, and training runs the tail.
    """
    base = model.get_layer(base_name)
    cut = base.get_layer(cut_name).output
    base_trunk = keras.Model(base.input, cut, name=f"{base.name}_trunk")
    base_tail = keras.Model(cut, base.output, name=f"{base.name}_tail")
    position = model.layers.index(base)

    inputs = keras.Input(shape=model.input.shape[1:], name="image")
    x = inputs
    for layer in model.layers[1:position]:
        x = layer(x)
    trunk = keras.Model(inputs, base_trunk(x), name=f"{model.name}Trunk")

    features = keras.Input(shape=trunk.output.shape[1:], name="features")
    x = base_tail(features)
    for layer in model.layers[position + 1 :]:
        x = layer(x)
    tail = keras.Model(features, x, name=f"{model.name}Tail")
    return trunk, tail


def decoding_threads():
    """How many images `image_batches` decodes at once: one per core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def image_batches(filenames, preprocess_image, batch_size):
    """A `tf.data` dataset of the image files, loaded by `preprocess_image`, in order.

    Its memory is bounded: a fixed number of images decoded at once (`decoding_threads`)
    and `prefetched_batches` batches ready, with autotuning off, whatever the number of
    files and however slow the model that reads the batches.
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(list(filenames))
    dataset = dataset.map(preprocess_image, num_parallel_calls=decoding_threads())
    return without_autotuning(dataset.batch(batch_size).prefetch(prefetched_batches))


def numpy_image_batches(filenames, preprocess_image, batch_size):
    """`image_batches` without TensorFlow: NumPy batches of the image files, in order.

    `preprocess_image` reads one file name (Pillow and NumPy under JAX and PyTorch); for a
    tuple of names, `preprocess_image(*names)` returns a tuple of images, and a batch is a
    tuple of their stacks. One thread per core decodes a batch while the previous one is
    used, so at most two batches are held.
    """
    filenames = list(filenames)
    starts = range(0, len(filenames), batch_size)
    with concurrent.futures.ThreadPoolExecutor(decoding_threads()) as pool:
        pending = None
        for start in [*starts, None]:
            # The next batch is submitted before the current one is handed out.
            following = None
            if start is not None:
                batch = filenames[start : start + batch_size]
                calls = [names if isinstance(names, tuple) else (names,) for names in batch]
                following = [pool.submit(preprocess_image, *names) for names in calls]
            if pending is not None:
                images = [future.result() for future in pending]
                if isinstance(images[0], tuple):
                    yield tuple(np.stack(parts) for parts in zip(*images, strict=True))
                else:
                    yield np.stack(images)
            pending = following


def decode_images_once(
    filenames, preprocess_image, image_size, batch_size, folder=None, progress=None
):
    """Decode and resize every image file once, into a store (one row per file).

    The example decodes and resizes the three images of every triplet in every epoch; an
    image is in about three triplets per epoch, so some thirty decodes over the example's
    ten epochs. The store keeps the float32 pixels `preprocess_image` gives, so training
    on it computes exactly what the example computes. `progress` (a
    `progress.Progress`) counts the images; by default a "Decoding images" one of its own.
    """
    filenames = list(filenames)
    store = new_store((len(filenames), *image_size, 3), np.float32, folder)
    if progress is None:
        progress = Progress("Decoding images", len(filenames))
    if keras_backend() != "tensorflow":
        batches = numpy_image_batches(filenames, preprocess_image, batch_size)
        return _fill_store(store, batches, progress)
    batches = image_batches(filenames, preprocess_image, batch_size)
    return _fill_store(store, batches.as_numpy_iterator(), progress)


def compute_trunk_features(
    trunk, filenames, preprocess_image, batch_size, folder=None, progress=None
):
    """Run the frozen trunk once over every image file; return a store of its features.

    The images stream through it a few batches at a time (`image_batches`), so the memory
    taken is the store's and a few batches'. The features keep the trunk's output dtype
    (float32, or float16 under mixed precision), so training on them computes exactly what
    training on the images would. `progress` as in `decode_images_once` ("Trunk
    features" by default).
    """
    filenames = list(filenames)
    if progress is None:
        progress = Progress("Trunk features", len(filenames))
    return _apply_to_files(trunk, filenames, preprocess_image, batch_size, folder, progress)


def embed_image_files(model, filenames, preprocess_image, batch_size, what):
    """`model` applied to every image file, in order, as a NumPy array (one row per file).

    The files are loaded by `preprocess_image` and streamed through `model` a few batches at
    a time (`image_batches`); the progress is shown under the label `what` (such as
    "Embedding the gallery").
    """
    filenames = list(filenames)
    shown = Progress(what, len(filenames))
    return np.asarray(_apply_to_files(model, filenames, preprocess_image, batch_size, None, shown))


def _apply_to_files(model, filenames, preprocess_image, batch_size, folder, progress):
    """A store of `model`'s outputs for every image file (see `compute_trunk_features`)."""
    filenames = list(filenames)
    output = model.output
    store = new_store((len(filenames), *output.shape[1:]), output.dtype, folder)
    if keras_backend() != "tensorflow":
        batches = numpy_image_batches(filenames, preprocess_image, batch_size)
        return _fill_store(store, (predict_rows(model, batch) for batch in batches), progress)
    batches = image_batches(filenames, preprocess_image, batch_size)
    apply = _traced_inference(model, batches.element_spec)
    outputs = (apply(batch).numpy() for batch in batches)
    return _fill_store(store, outputs, progress)


# One traced inference function per model and input signature, kept while the model lives.
_traced = weakref.WeakKeyDictionary()


def _traced_inference(model, batch_spec):
    """`model(images, training=False)` as a `tf.function` for batches of `batch_spec`.

    A traced function frees each activation once it is used: calling the model eagerly held
    all of ResNet50's activations for the batch at once, 3.5 GB at 32 images of 200 x 200,
    for as long as the pass lasted. (`predict_on_batch` would trace too, but under
    MirroredStrategy it returns whole global batches for a short last one.) The signature's
    batch size is unknown, so a short last batch, and the next list of files, reuse the
    one trace of the model: a trace of ResNet50 costs about a second on a CPU.
    """
    import tensorflow as tf

    functions = _traced.setdefault(model, {})
    key = (tuple(batch_spec.shape), batch_spec.dtype)
    if key not in functions:
        held = weakref.ref(model)  # the function must not keep its model alive
        functions[key] = tf.function(
            lambda images: held()(images, training=False), input_signature=[batch_spec]
        )
    return functions[key]


def cache_inputs(file_lists, preprocess_image, image_size, batch_size, folder=None, trunk=None):
    """One store per list of image files: the `trunk`'s features, or the decoded images.

    With a frozen `trunk`, each image runs through it once (`compute_trunk_features`);
    without one, each image is decoded once (`decode_images_once`). Shows the progress over
    all the lists together, then prints what was cached, its size and the time it took;
    returns the stores and the seconds.
    """
    file_lists = [list(files) for files in file_lists]
    started = time.perf_counter()
    label = "Decoding images" if trunk is None else "Trunk features"
    shown = Progress(label, sum(len(files) for files in file_lists))
    if trunk is not None:
        caches = [
            compute_trunk_features(trunk, files, preprocess_image, batch_size, folder, shown)
            for files in file_lists
        ]
    else:
        caches = [
            decode_images_once(files, preprocess_image, image_size, batch_size, folder, shown)
            for files in file_lists
        ]
    seconds = time.perf_counter() - started
    what = "decoded images" if trunk is None else "features of the frozen trunk"
    print(
        f"Cached the {what} of {sum(len(cache) for cache in caches)} images "
        f"({sum(cache.nbytes for cache in caches) / 1e6:,.1f} MB) in {seconds:.1f} s",
        flush=True,
    )
    return caches, seconds


def _fill_store(store, batches, progress):
    """Write consecutive batches of rows into `store`, from its first row; return it."""
    start = 0
    for batch in batches:
        store[start : start + len(batch)] = batch
        start += len(batch)
        progress.advance(len(batch))
    return store


def predict_rows(model, batch):
    """`model` (inference mode) on one NumPy batch, as a NumPy array: JAX's and PyTorch's path.

    `predict_on_batch` runs compiled (JAX) or without gradients (PyTorch), so that the
    activations of a batch are freed as they are used. Under PyTorch, a Functional model
    runs eagerly and keeps every layer's output until the call returns (Keras's
    `Function._run_through_graph`), so the batch goes through `torch_rows_at_once` rows at
    a time.
    """
    if keras_backend() == "torch" and len(batch) > torch_rows_at_once:
        starts = range(0, len(batch), torch_rows_at_once)
        return np.concatenate(
            [predict_rows(model, batch[start : start + torch_rows_at_once]) for start in starts]
        )
    return np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(batch)))


def gather_rows(store, indices):
    """Rows `indices` of a store, as a tensor (inside a `tf.data` map).

    NumPy does the gathering, so a store memory-mapped from disk works as well as one in
    memory.
    """
    import tensorflow as tf

    rows = tf.numpy_function(
        lambda batch: np.asarray(store[batch]), [indices], tf.as_dtype(store.dtype), stateful=False
    )
    return tf.ensure_shape(rows, (None, *store.shape[1:]))


def make_store_dataset(store, triplet_indices, batch_size, share=(0, 1, 1)):
    """Batches `((anchor, positive, negative),)` of rows of `store`, for index triplets.

    The triplet is the batch's one element, its inputs, as Keras's steps read a batch
    (`(x,)`: no targets, no sample weights). `triplet_indices` is a `tf.data` dataset of
    index triplets under TensorFlow; a finite one is read a pass by number (`pipelines.
    RedrawnPasses`), so that a resumed run goes on with the draws of a reshuffling one. Under
    JAX and PyTorch it is three arrays (fixed triplets: validation) or a function of a pass's
    number that returns them (training), and the batches are a `pipelines.TripletBatches`, of
    which this process feeds `share` (`devices.Placement.share`); fixed triplets are padded,
    never cut, to split over devices.
    """
    if keras_backend() != "tensorflow":
        from siamese_support.pipelines import TripletBatches

        if callable(triplet_indices):
            return TripletBatches(store, triplet_indices, batch_size, *share)
        fixed = functools.partial(lambda triplets, epoch: triplets, triplet_indices)
        return TripletBatches(store, fixed, batch_size, *share, pad=True)
    import tensorflow as tf

    from siamese_support.pipelines import RedrawnPasses

    if int(triplet_indices.cardinality()) > 0:  # not `repeat()`ed (benchmarks)
        triplet_indices = RedrawnPasses(triplet_indices).dataset()
    dataset = triplet_indices.batch(batch_size, drop_remainder=False)
    dataset = dataset.map(
        lambda anchor, positive, negative: (
            tuple(gather_rows(store, indices) for indices in (anchor, positive, negative)),
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return without_autotuning(dataset.prefetch(tf.data.AUTOTUNE))


def embed_store(network, store, batch_size, what="Embedding the validation images"):
    """`network` applied to every row of a store of images or features, as a NumPy array.

    The rows are gathered a few batches ahead of the network (`prefetched_batches`); the
    progress is shown under the label `what`. Under JAX and PyTorch, batch by batch
    (`predict_rows`), with the same progress lines.
    """
    if keras_backend() != "tensorflow":
        shown = Progress(what, len(store))
        batches = (store[start : start + batch_size] for start in range(0, len(store), batch_size))
        return _fill_store(
            np.empty((len(store), *network.output.shape[1:]), np.float32),
            (predict_rows(network, np.asarray(batch)) for batch in batches),
            shown,
        )
    import tensorflow as tf

    dataset = tf.data.Dataset.range(len(store)).batch(batch_size)
    dataset = dataset.map(
        lambda indices: gather_rows(store, indices), num_parallel_calls=tf.data.AUTOTUNE
    )
    dataset = without_autotuning(dataset.prefetch(prefetched_batches))
    return network.predict(dataset, **predict_progress(what, len(store), batch_size))


def pipeline_throughput(dataset, batches):
    """Triplets per second that a dataset of triplet batches delivers, with no model."""
    iterator = iter(dataset)
    next(iterator)  # warm-up: the first batch pays for starting the threads
    count = 0
    start = time.perf_counter()
    for _ in range(batches):
        try:
            # A store's batch is ((anchors, positives, negatives),), `make_dataset`'s the three.
            anchors = next(iterator)[0]
            count += len(anchors[0] if isinstance(anchors, tuple) else anchors)
        except StopIteration:
            break
    elapsed = time.perf_counter() - start
    return count / elapsed if elapsed > 0 else float("inf")
