"""Input pipelines for the scripts: per-epoch shuffled index batches, with or without TensorFlow.

The tutorials fit on arrays (MNIST) or on a `tf.data` pipeline of file names (triplet). The
ports gather rows by index instead (see the scripts); the generic parts of that, which say
nothing about Siamese networks, live here. TensorFlow is imported only by the functions
that build `tf.data` pipelines: `PairBatches` and `TripletBatches` need only NumPy and Keras.

Every dataset here that draws anew on each pass (an order, negatives) draws from its seed and
the pass's number alone, and `tell_epoch` sets that number from the epoch `fit` is in: a run
resumed at epoch k reads what an uninterrupted run read in its epoch k.
"""

import functools
import threading
import weakref

import keras
import numpy as np

from siamese_support.devices import keeps_data_on_device, without_autotuning

__all__ = ["PairBatches", "RedrawnPasses", "TripletBatches", "pair_dataset", "tell_epoch"]
__all__ += ["shuffled_index_batches", "without_autotuning"]

# The datasets made here that draw anew on each pass, for `tell_epoch` (weak references: a
# dataset no longer used is not kept for this).
_drawing_datasets = weakref.WeakSet()


def tell_epoch(epoch, strategy=False):
    """Make every dataset made here that draws anew on each pass read `fit`'s epoch `epoch`.

    A dataset's draws are a function of its seed and of a pass's number. The numbers given
    are the ones Keras 3.15's `fit` gave epoch e of an uninterrupted run: pass e + 1 of a
    `PyDataset` (`fit` ends a pass, `on_epoch_end`, before the first epoch), pass 2e of a
    `tf.data` pipeline (`fit` makes one more iterator at each epoch's end, unread, and that
    draws too), 2e + 1 under a `tf.distribute` `strategy` (`fit` first reads one batch to
    build the model). So uninterrupted runs keep the figures they had, and a resumed run,
    whose `fit` starts at a later epoch, goes on with the draws of the run it resumes.
    """
    for dataset in list(_drawing_datasets):
        dataset.use_epoch(epoch, strategy)


class RedrawnPasses:
    """Pass number p of a finite `tf.data` dataset that draws anew on each pass, on demand.

    Such a dataset (`shuffle(..., reshuffle_each_iteration=True)`, `Dataset.random(...,
    rerandomize_each_iteration=True)`) draws its k-th order when its k-th iterator is made,
    read or not: what a pass reads depends on how many iterators were made before it. Here
    pass p is drawn by making (and dropping) an iterator for each pass before it not drawn
    yet, then reading pass p whole; the passes read are kept, so pass p is the same whenever
    it is asked for. `source` must be read through this object alone.

    `dataset()` is the pipeline to read: its passes read pass `passes` of `source`, which
    then goes up by one, as `PairBatches` counts its passes; `use_epoch` sets it.
    """

    def __init__(self, source):
        self.count = int(source.cardinality())
        if self.count < 1:
            raise ValueError("RedrawnPasses needs a finite dataset with at least one element")
        self.source = source
        self.passes = 0  # the pass that the pipeline's next pass reads
        self.drawn = 0  # the iterators made of `source` so far: the passes it drew
        self.kept = {}
        self.lock = threading.RLock()  # the pipeline asks for passes from tf.data's threads
        _drawing_datasets.add(self)

    def read_pass(self, number):
        """Pass `number` of `source`, whole: its elements stacked, as NumPy arrays."""
        import tensorflow as tf

        with self.lock:
            if number not in self.kept:
                if number < self.drawn:
                    raise ValueError(f"pass {number} was drawn and skipped, never read")
                for _ in range(number - self.drawn):
                    iter(self.source)  # made, not read: it draws its pass
                whole = next(iter(self.source.batch(self.count)))
                self.kept[number] = tf.nest.map_structure(np.asarray, whole)
                self.drawn = number + 1
            return self.kept[number]

    def use_epoch(self, epoch, strategy=False):
        """Read the pass of `fit`'s epoch `epoch` next (see `tell_epoch`)."""
        number = 2 * epoch + int(strategy)
        with self.lock:
            self.passes = number
            if number >= self.drawn:  # drawn here rather than in tf.data's thread
                self.read_pass(number)

    def _next_pass(self):
        with self.lock:
            number = self.passes
            self.passes += 1
            return self.read_pass(number)

    def dataset(self):
        """A `tf.data` pipeline of `source`'s elements, each pass those of one numbered pass."""
        import tensorflow as tf

        specs = tf.nest.flatten(self.source.element_spec)

        def read(_):
            arrays = tf.py_function(
                lambda: tf.nest.flatten(self._next_pass()), [], [spec.dtype for spec in specs]
            )
            arrays = [
                tf.ensure_shape(array, tf.TensorShape([None]).concatenate(spec.shape))
                for array, spec in zip(arrays, specs, strict=True)
            ]
            return tf.nest.pack_sequence_as(self.source.element_spec, arrays)

        passes = tf.data.Dataset.range(1).map(read).unbatch()
        return passes.apply(tf.data.experimental.assert_cardinality(self.count))


def shuffled_index_batches(count, batch_size, seed):
    """Batches of the indices 0 to count - 1, in a new random order every epoch.

    The order is one permutation drawn inside the pipeline at the start of each pass, which
    costs `count` integers; `Dataset.shuffle` would hold `count` separate elements in its
    buffer, tens of megabytes for MNIST's 108,400 training pairs.
    """
    import tensorflow as tf

    def permutation(random_value):
        pass_seed = tf.stack([random_value, tf.constant(seed, tf.int64)])
        return tf.random.experimental.stateless_shuffle(tf.range(count), seed=pass_seed)

    def batched(order):
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    # Dataset.random draws a new value on each pass, so each epoch gets its own order; which
    # pass's value is chosen by its number (`RedrawnPasses`, `tell_epoch`).
    pass_values = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
    pass_values = RedrawnPasses(pass_values).dataset()
    orders = pass_values.map(permutation, num_parallel_calls=tf.data.AUTOTUNE)
    # The length is stated because a pipeline built with flat_map has none that Keras can
    # read, and without one Keras warns at the end of every epoch.
    batch_count = -(-count // batch_size)
    return orders.flat_map(batched).apply(tf.data.experimental.assert_cardinality(batch_count))


def pair_dataset(images, pairs, labels=None, batch_size=128, seed=None):
    """A `tf.data` pipeline of `((image_a, image_b), label)` batches gathered from index pairs.

    The uint8 `images` stay in one tensor; each batch gathers its pairs' images and scales
    them to [0, 1] (and their labels, as a column, when `labels` is given). With `seed`, a
    new order every epoch (`shuffled_index_batches`); without, the pairs in order.
    """
    import tensorflow as tf

    image_table = tf.convert_to_tensor(images)
    pair_table = tf.convert_to_tensor(pairs)
    label_table = None if labels is None else tf.convert_to_tensor(labels)
    if seed is None:
        batches = tf.data.Dataset.range(len(pairs)).batch(batch_size)
    else:
        batches = shuffled_index_batches(len(pairs), batch_size, seed)

    def gather_pairs(indices):
        batch_pairs = tf.gather(pair_table, indices)
        pair_images = tf.cast(tf.gather(image_table, batch_pairs), tf.float32) / 255.0
        inputs = (pair_images[:, 0], pair_images[:, 1])
        if label_table is None:
            return (inputs,)
        return inputs, tf.gather(label_table, indices)[:, None]

    dataset = batches.map(gather_pairs, num_parallel_calls=tf.data.AUTOTUNE)
    return without_autotuning(dataset.prefetch(tf.data.AUTOTUNE))


# The float32 value p / 255 of each uint8 pixel p, as NumPy divides it (`PairBatches`' pixels).
SCALED_PIXELS = np.arange(256, dtype=np.float32) / np.float32(255.0)


def to_device(arrays):
    """NumPy arrays (a tuple, None allowed) on JAX's default device, copied from the host once."""
    import jax

    return jax.device_put(arrays)


@functools.cache
def _pair_gather():
    """`PairBatches`' batch, gathered from tables on the device by one compiled call.

    The same numbers as its NumPy batch: each uint8 pixel p becomes the float32 p / 255,
    looked up in a table that NumPy divided (XLA would multiply by 1 / 255 instead, which
    moves half of the values by one unit in the last place).
    """
    import jax

    scaled = jax.numpy.asarray(SCALED_PIXELS)

    def gather(images, pairs, labels, rows):
        pair_images = scaled[images[pairs[rows]]]
        inputs = (pair_images[:, 0], pair_images[:, 1])
        return (inputs,) if labels is None else (inputs, labels[rows][:, None])

    return jax.jit(gather)


@functools.cache
def _triplet_gather():
    """`TripletBatches`' batch `((anchor, positive, negative),)` gathered on the device."""
    import jax

    return jax.jit(lambda store, rows: (tuple(store[part] for part in rows),))


class PairBatches(keras.utils.PyDataset):
    """`((image_a, image_b), label)` batches gathered from index pairs, with NumPy alone.

    The input pipeline of the MNIST script under JAX and PyTorch, with the `tf.data`
    pipeline's rules: uint8 `images` scaled to [0, 1] batch by batch, `batch_size` pairs a
    batch, the last one short, and with `seed` a new order of the pairs every epoch (one
    permutation per pass, drawn from the seed and the pass's number; `use_epoch` sets it).

    Spread over `device_count` devices (Keras's `DataParallel`), in `process_count`
    processes, each process feeds its share of every global batch: the `process_index`-th
    of `process_count` equal slices, which Keras puts together into the global batch. A
    batch that does not split evenly over the devices (a short last one) is padded with
    repeats of its first pair, weighted 0, so that every pair is seen once an epoch; the
    batches then carry sample weights (1 for every real pair).

    `on_device` (default: `devices.keeps_data_on_device`, JAX on one accelerator): the
    images, pairs and labels are copied to the device once, and each batch is gathered and
    scaled there, by one compiled call, from the batch's row numbers.
    """

    def __init__(
        self,
        images,
        pairs,
        labels=None,
        batch_size=128,
        seed=None,
        process_index=0,
        process_count=1,
        device_count=1,
        on_device=None,
    ):
        super().__init__()
        self.images, self.pairs = np.asarray(images), np.asarray(pairs)
        self.labels = None if labels is None else np.asarray(labels, np.float32)
        self.batch_size, self.seed = batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.device_count = device_count
        if on_device is None:
            nbytes = sum(
                array.nbytes
                for array in (self.images, self.pairs, self.labels)
                if array is not None
            )
            on_device = keeps_data_on_device(nbytes, device_count)
        self.on_device = bool(on_device) and device_count == 1
        if self.on_device:
            self.images, self.pairs, self.labels = to_device((self.images, self.pairs, self.labels))
        self.passes = 0
        self.order = self._order()
        if seed is not None:
            _drawing_datasets.add(self)

    def use_epoch(self, epoch, strategy=False):
        """Read the pass of `fit`'s epoch `epoch` next (see `tell_epoch`)."""
        self.passes = epoch + 1
        self.order = self._order()

    def _order(self):
        if self.seed is None:
            return np.arange(len(self.pairs))
        return np.random.default_rng([self.seed, self.passes]).permutation(len(self.pairs))

    def __len__(self):
        return -(-len(self.pairs) // self.batch_size)

    def __getitem__(self, index):
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        weights = None
        if self.device_count > 1:
            padded_size = -(-len(rows) // self.device_count) * self.device_count
            padded = np.concatenate([rows, np.repeat(rows[:1], padded_size - len(rows))])
            weights = (np.arange(padded_size) < len(rows)).astype(np.float32)
            share = padded_size // self.process_count
            start = self.process_index * share
            rows, weights = padded[start : start + share], weights[start : start + share]
        if self.on_device:
            return _pair_gather()(self.images, self.pairs, self.labels, rows.astype(np.int32))
        # Each side gathered apart (contiguous, as the step reads it) and scaled in one pass:
        # the values of `astype(float32) / 255`, measured 30 % quicker on 2 cores.
        chosen = self.pairs[rows]
        inputs = tuple(
            np.divide(self.images[chosen[:, side]], np.float32(255.0), dtype=np.float32)
            for side in (0, 1)
        )
        if self.labels is None:
            return (inputs,)
        labels = self.labels[rows][:, None]
        return (inputs, labels) if weights is None else (inputs, labels, weights)

    def on_epoch_end(self):
        self.passes += 1
        self.order = self._order()


class TripletBatches(keras.utils.PyDataset):
    """`((anchor, positive, negative),)` batches of rows of a store, with NumPy alone.

    The triplet script's input under JAX and PyTorch, with its `tf.data` pipeline's rules:
    `triplets(number)` returns a pass's anchor, positive and negative row indices (three
    arrays, in the order they are read; `use_epoch` sets the pass's number), `batch_size`
    triplets a batch, the last one short.
    The triplet is the batch's only element, the model's input, as Keras's own training step
    reads a batch: `(x,)`.

    Spread over `device_count` devices (Keras's `DataParallel`) in `process_count`
    processes, each process feeds the `process_index`-th of equal slices of every global
    batch, as `PairBatches` does. A short last batch that does not split evenly over the
    devices loses its last few triplets when `pad` is false (training: fewer than
    `device_count`, others every epoch, as the order changes), or is padded with repeats
    of its first triplet, weighted 0, when `pad` is true (validation: every triplet counts
    once); its batches then carry sample weights, `((a, p, n), None, weights)`.

    `on_device` as in `PairBatches`: a store in memory (never a `stores.DiskStore`) goes to
    the device once, and each batch is gathered there.
    """

    def __init__(
        self,
        store,
        triplets,
        batch_size,
        process_index=0,
        process_count=1,
        device_count=1,
        pad=False,
        on_device=None,
    ):
        super().__init__()
        in_memory = isinstance(store, np.ndarray)
        if on_device is None:
            on_device = in_memory and keeps_data_on_device(store.nbytes, device_count)
        self.on_device = bool(on_device) and in_memory and device_count == 1
        if self.on_device:
            store = to_device(store)
        self.store, self.triplets, self.batch_size = store, triplets, batch_size
        self.process_index, self.process_count = process_index, process_count
        self.device_count, self.pad = device_count, pad
        self.passes = 0
        self.indices = np.stack(triplets(self.passes))
        _drawing_datasets.add(self)

    def use_epoch(self, epoch, strategy=False):
        """Read the pass of `fit`'s epoch `epoch` next (see `tell_epoch`)."""
        self.passes = epoch + 1
        self.indices = np.stack(self.triplets(self.passes))

    def __len__(self):
        count = self.indices.shape[1]
        if self.device_count > 1 and not self.pad:
            count -= count % self.batch_size % self.device_count  # see the class's docstring
        return -(-count // self.batch_size)

    def __getitem__(self, index):
        rows = self.indices[:, index * self.batch_size : (index + 1) * self.batch_size]
        weights = None
        if self.device_count > 1:
            size = rows.shape[1]
            if self.pad:
                padded_size = -(-size // self.device_count) * self.device_count
                repeats = np.repeat(rows[:, :1], padded_size - size, axis=1)
                rows = np.concatenate([rows, repeats], axis=1)
                weights = (np.arange(padded_size) < size).astype(np.float32)
            else:
                rows = rows[:, : size - size % self.device_count]
            share = rows.shape[1] // self.process_count
            start = self.process_index * share
            rows = rows[:, start : start + share]
            weights = None if weights is None else weights[start : start + share]
        if self.on_device:
            return _triplet_gather()(self.store, rows.astype(np.int32))
        triplet = tuple(np.asarray(self.store[part]) for part in rows)
        return (triplet,) if weights is None else (triplet, None, weights)

    def on_epoch_end(self):
        self.passes += 1
        self.indices = np.stack(self.triplets(self.passes))
