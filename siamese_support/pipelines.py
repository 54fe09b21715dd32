"""`tf.data` helpers for the scripts' input pipelines: per-epoch shuffled index batches.

The tutorials fit on arrays (MNIST) or on a `tf.data` pipeline of file names (triplet). The
ports gather rows by index instead (see the scripts); the generic parts of that, which say
nothing about Siamese networks, live here. TensorFlow is imported only by the functions.
"""

from siamese_support.devices import without_autotuning

__all__ = ["shuffled_index_batches", "without_autotuning"]


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

    # Dataset.random draws a new value on each pass, so each epoch gets its own order.
    pass_values = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
    orders = pass_values.map(permutation, num_parallel_calls=tf.data.AUTOTUNE)
    # The length is stated because a pipeline built with flat_map has none that Keras can
    # read, and without one Keras warns at the end of every epoch.
    batch_count = -(-count // batch_size)
    return orders.flat_map(batched).apply(tf.data.experimental.assert_cardinality(batch_count))
