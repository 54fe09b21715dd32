"""A resumed run goes on with the random draws of the run it resumes (`--resume`).

Every dataset that draws anew on each pass (an order of the pairs, negatives) draws from its
seed and the pass's number, which `pipelines.tell_epoch` sets from the epoch `fit` is in;
the layers' seed generators (MNIST's Dropout masks) are kept with the backup
(`resumed_draws`). So a run stopped after its first epoch and resumed writes the history
an uninterrupted run writes, to the last digit: checked here for both scripts under the
backend the tests run under (CI: TensorFlow, then JAX where TensorFlow is not installed),
and, in the fast tests, for the datasets and the seed generators themselves.
"""

import csv
import textwrap
import time

import helpers
import keras
import numpy as np
import pytest
from helpers import FIXTURE, MNIST, TRIPLET, describe

from siamese_support import pipelines, resumed_draws

tensorflow_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="checks TensorFlow's tf.data pipelines"
)


def read_history(output_dir):
    with open(output_dir / "history.csv", newline="") as stream:
        return list(csv.DictReader(stream))


# ---------------------------------------------------------------------------
# The datasets: epoch e's draws, whatever passes came before
# ---------------------------------------------------------------------------


def test_pair_batches_read_the_pass_of_the_epoch_they_are_told():
    images = np.zeros((30, 2, 2), np.uint8)
    pairs = np.stack([np.arange(30), np.arange(30)], axis=1)

    def batches(seed=5):
        return pipelines.PairBatches(images, pairs, np.ones(30), 8, seed, on_device=False)

    # `fit` ends a pass before its first epoch: epoch e reads pass e + 1, uninterrupted.
    uninterrupted = batches()
    orders = []
    for _ in range(4):
        uninterrupted.on_epoch_end()
        orders.append(uninterrupted.order.copy())
    assert all(not np.array_equal(orders[0], order) for order in orders[1:])
    for passes_before in (0, 1, 4):  # told epoch 2 after that many passes: the same order
        told = batches()
        for _ in range(passes_before):
            told.on_epoch_end()
        told.use_epoch(2)
        np.testing.assert_array_equal(told.order, orders[2])
    # Another seed, other orders.
    other = batches(seed=6)
    other.use_epoch(2)
    assert not np.array_equal(other.order, orders[2])


def test_triplet_batches_read_the_triplets_of_the_epoch_they_are_told():
    store = np.arange(20, dtype=np.float32)[:, None]

    def triplets(number):  # as the script's `epoch_triplet_indices`: a pass's own draws
        order = np.random.default_rng([3, number]).permutation(10)
        return order, order + 10, (order + 1 + number) % 10

    def first_batch(dataset):
        ((anchor, positive, negative),) = dataset[0]
        return np.concatenate([anchor, positive, negative], axis=1)

    uninterrupted = pipelines.TripletBatches(store, triplets, 4, on_device=False)
    uninterrupted.on_epoch_end()  # as `fit` does before its first epoch
    epochs = []
    for _ in range(3):
        epochs.append(first_batch(uninterrupted))
        uninterrupted.on_epoch_end()
    told = pipelines.TripletBatches(store, triplets, 4, on_device=False)
    for epoch in (2, 0, 1):
        told.use_epoch(epoch)
        np.testing.assert_array_equal(first_batch(told), epochs[epoch])


@tensorflow_only
def test_tf_data_pipelines_read_the_pass_of_the_epoch_they_are_told():
    import tensorflow as tf

    import triplet_totally_looks_like as tll
    from siamese_support import stores

    def one_pass(dataset):
        return np.concatenate([np.ravel(x) for x in tf.nest.flatten(list(dataset))])

    def as_batches(*columns, size=5):  # a pass's values, as `one_pass` flattens its batches
        starts = range(0, len(columns[0]), size)
        return np.concatenate(
            [np.ravel(column[s : s + size]) for s in starts for column in columns]
        )

    # Pass k: the k-th draws of the tf.data datasets the pipelines were built on (the
    # scripts' pipelines before passes were numbered read them so, one pass per iterator).
    images = np.arange(12, dtype=np.uint8)[:, None] * np.ones((1, 2), np.uint8)
    pairs = np.stack([np.arange(12), np.arange(12)], axis=1).astype(np.int32)
    pass_values = tf.data.Dataset.random(seed=7, rerandomize_each_iteration=True).take(1)
    pair_passes = []
    for _ in range(6):
        seed = tf.stack([next(iter(pass_values)), tf.constant(7, tf.int64)])
        order = tf.random.experimental.stateless_shuffle(tf.range(12), seed=seed).numpy()
        pixels = np.repeat(order.astype(np.float32) / np.float32(255), 2).reshape(-1, 2)
        pair_passes.append(as_batches(pixels, pixels, np.ones(12, np.float32)))
    triplet_source = tll.training_triplet_indices(12, seed=7)
    triplet_passes = [
        as_batches(*np.array(list(triplet_source.as_numpy_iterator()), np.float32).T)
        for _ in range(6)
    ]
    store = np.arange(24, dtype=np.float32)[:, None]  # row i holds i
    builders = {
        "pairs": lambda: pipelines.pair_dataset(images, pairs, np.ones(12, np.float32), 5, 7),
        "triplets": lambda: stores.make_store_dataset(
            store, tll.training_triplet_indices(12, seed=7), 5
        ),
    }
    for name, expected in (("pairs", pair_passes), ("triplets", triplet_passes)):
        assert not np.array_equal(expected[0], expected[1])
        # Never told an epoch, each pass reads the next one.
        uninterrupted = builders[name]()
        for number in range(3):
            np.testing.assert_array_equal(one_pass(uninterrupted), expected[number], name)
        # Told epoch e, a pipeline reads pass 2e, 2e + 1 under a tf.distribute strategy
        # (those of an uninterrupted `fit`), whatever it read before.
        fresh, used = builders[name](), builders[name]()
        for _ in range(5):
            one_pass(used)
        for epoch, strategy in ((0, False), (1, False), (2, True)):
            pipelines.tell_epoch(epoch, strategy)
            for dataset in (fresh, used, uninterrupted):
                np.testing.assert_array_equal(one_pass(dataset), expected[2 * epoch + strategy])
    # A pass drawn without being read (skipped to reach a later one) cannot be read again.
    skipping = pipelines.RedrawnPasses(tf.data.Dataset.random(seed=1).take(2))
    skipping.read_pass(3)
    with pytest.raises(ValueError, match="pass 1 was drawn and skipped"):
        skipping.read_pass(1)


def test_seed_generator_states_are_kept_for_the_resumed_epoch(tmp_path):
    def dropout_model():
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dropout(0.5, seed=11)])
        model.build((None, 64))
        return model

    ones = np.ones((4, 64), np.float32)
    uninterrupted = dropout_model()
    uninterrupted(ones, training=True)  # "epoch 0": one draw
    resumed_draws.save_seed_states(uninterrupted, tmp_path, epoch=0)
    expected = keras.ops.convert_to_numpy(uninterrupted(ones, training=True))  # epoch 1's mask

    resumed = dropout_model()  # a new process: its seed generator starts over
    callback = resumed_draws.ResumedDraws(tmp_path)
    callback.set_model(resumed)
    callback.on_train_begin()
    callback.on_epoch_begin(1)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(resumed(ones, training=True)), expected
    )
    # Without the kept states, the resumed epoch would draw the first epoch's mask again.
    assert not np.array_equal(
        keras.ops.convert_to_numpy(dropout_model()(ones, training=True)), expected
    )


# ---------------------------------------------------------------------------
# The scripts: stopped after an epoch, resumed, the history of an uninterrupted run
# ---------------------------------------------------------------------------

# Runs the script, uninterrupted, and copies its output folder (`--output-dir NAME`) to
# NAME-stopped just after the backup of its first epoch: what a run killed at that point
# leaves (a second run, killed, would cost another process). The file `copied` says when.
COPIED_AFTER_FIRST_EPOCH = textwrap.dedent(
    """
    import os, runpy, shutil, sys
    import keras

    original = keras.callbacks.BackupAndRestore.on_epoch_end

    def on_epoch_end(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 0:
            folder = os.path.dirname(os.path.abspath(self.backup_dir))
            shutil.copytree(folder, folder + "-stopped")
            open("copied", "w").close()

    keras.callbacks.BackupAndRestore.on_epoch_end = on_epoch_end
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)
RUNS = {
    # Dropout, and a new order of the pairs every epoch: 600 digits, 3 epochs.
    "mnist": (MNIST, ["--data", FIXTURE, "--limit", "600", "--epochs", "3", "--no-plots"]),
    # A new order and new negatives every epoch: the smallest images, 2 epochs, and 40 pairs
    # that make whole batches of 8 (fewer shapes to compile).
    "triplet": (
        TRIPLET,
        ["--dry-run", "--limit", "40", "--image-size", "32", "--epochs", "2", "--batch-size", "8"]
        + ["--no-plots"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(RUNS))
def test_a_stopped_and_resumed_run_writes_the_history_of_an_uninterrupted_one(script, tmp_path):
    path, args = RUNS[script]
    whole = helpers.start(path, [*args, "--output-dir", "run"], tmp_path, COPIED_AFTER_FIRST_EPOCH)
    deadline = time.monotonic() + 300
    while not (tmp_path / "copied").exists() and whole.poll() is None:
        assert time.monotonic() < deadline, "no backup of a first epoch in 300 s"
        time.sleep(0.1)
    assert (tmp_path / "copied").exists(), describe(helpers.finish(whole))
    # A new process goes on from the copy, while the uninterrupted run finishes.
    resumed = helpers.run(path, [*args, "--output-dir", "run-stopped", "--resume"], tmp_path)
    whole = helpers.finish(whole)
    assert whole.returncode == 0, describe(whole)
    assert resumed.returncode == 0, describe(resumed)
    assert "Epoch 1/" not in resumed.stdout  # it went on from epoch 2

    expected = read_history(tmp_path / "run")
    assert [int(row["epoch"]) for row in expected] == list(range(len(expected)))
    # Every figure as printed, to the last digit: the same computation on the same draws.
    # Measured so on CPUs, with TensorFlow 2.21 and with JAX 0.10.2.
    assert read_history(tmp_path / "run-stopped") == expected
