"""Negatives mined in the triplet script's training step (`--negatives semi-hard` or `hard`).

The choice is checked on hand-made embeddings against the definitions (semi-hard, hard, the
fallback rule, never the anchor's own pair), the loss and its gradients against explicitly
built triplets, the training step under mixed precision, XLA and tf.distribute, and the
command line on real images (MNIST digits in the Totally Looks Like layout).
"""

import json
import textwrap

import helpers
import numpy as np
import pytest
from helpers import TOOLS, TRIPLET, describe

import triplet_totally_looks_like as tll
from siamese_support import command_line, mining, real_pairs
from triplet_totally_looks_like import keras, ops, tf

MARGIN = 0.5

# ---------------------------------------------------------------------------
# A hand-made batch: five pairs on a line (one-dimensional embeddings)
# ---------------------------------------------------------------------------

# Candidates are numbered anchors first (0-4), then positives (5-9); squared distances.
ANCHORS = [0.0, -1.1, 1.2, 10.0, 20.0]
POSITIVES = [1.0, 0.5, 3.0, 10.2, 45.0]
# Anchor 0: d(A, P) = 1; anchors 1 (at 1.21) and 2 (at 1.44) are semi-hard, in (1, 1.5);
#   the closest image of another pair is positive 1 (0.25), hard.
# Anchor 1: d(A, P) = 2.56; nothing in (2.56, 3.06); positive 0 (4.41) is the closest one
#   farther than the positive, beyond the margin; anchor 0 (1.21) is the closest.
# Anchor 2: d(A, P) = 3.24; anchor 1 (5.29) is the closest one farther; positive 0 (0.04)
#   the closest.
# Anchor 3: d(A, P) = 0.04, its own positive; positive 2 (49) is both the closest image of
#   another pair and the closest farther than the positive.
# Anchor 4: d(A, P) = 625; every other image is closer (all hard): the farthest of them is
#   anchor 1 (445.21); the closest is positive 3 (96.04).
EXPECTED = {"semi-hard": [1, 5, 1, 7, 1], "hard": [6, 0, 5, 7, 8]}


def _column(values):
    return np.asarray(values, np.float32)[:, None]


def _oracle(anchors, positives, strategy, margin=MARGIN):
    """Each anchor's negative by the definitions, in plain Python over every candidate."""
    anchors, positives = np.asarray(anchors, np.float64), np.asarray(positives, np.float64)
    pair_count = len(anchors)
    candidates = np.concatenate([anchors, positives])
    chosen = []
    for i in range(pair_count):
        positive_distance = np.sum((anchors[i] - positives[i]) ** 2)
        others = [k for k in range(2 * pair_count) if k % pair_count != i]
        distance = {k: np.sum((anchors[i] - candidates[k]) ** 2) for k in others}
        semi_hard = [
            k for k in others if positive_distance < distance[k] < positive_distance + margin
        ]
        farther = [k for k in others if distance[k] > positive_distance]
        if strategy == "hard":
            chosen.append(min(others, key=distance.get))
        elif semi_hard:  # FaceNet's semi-hard negative: the closest such
            chosen.append(min(semi_hard, key=distance.get))
        elif farther:  # TripletSemiHardLoss: the closest farther than the positive
            chosen.append(min(farther, key=distance.get))
        else:  # ... or, when every one is closer, the farthest
            chosen.append(max(others, key=distance.get))
    return chosen


@pytest.mark.parametrize("strategy", ["semi-hard", "hard"])
def test_the_hand_made_batch_gets_the_negatives_of_the_definitions(strategy):
    indices, found = mining.select_negatives(_column(ANCHORS), _column(POSITIVES), strategy)
    assert ops.convert_to_numpy(indices).tolist() == EXPECTED[strategy]
    assert ops.convert_to_numpy(found).tolist() == [True] * 5
    # The oracle agrees with the hand-worked answers.
    assert _oracle(_column(ANCHORS), _column(POSITIVES), strategy) == EXPECTED[strategy]


def test_semi_hard_negatives_lie_within_the_margin_where_one_exists():
    anchors, positives = _column(ANCHORS), _column(POSITIVES)
    chosen = EXPECTED["semi-hard"]
    candidates = np.concatenate([anchors, positives])
    positive_distances = np.sum((anchors - positives) ** 2, axis=1)
    negative_distances = np.sum((anchors - candidates[chosen]) ** 2, axis=1)
    # Anchor 0 has semi-hard negatives, and gets the closest one (anchor 1, not anchor 2).
    assert positive_distances[0] < negative_distances[0] < positive_distances[0] + MARGIN
    assert negative_distances[0] == pytest.approx(1.21)
    # Anchors 1-3 have none: they get the closest farther one, beyond the margin (no loss).
    assert np.all(negative_distances[1:4] >= positive_distances[1:4] + MARGIN)
    # Anchor 4's other images are all closer than its positive: the farthest of them.
    assert negative_distances[4] < positive_distances[4]
    assert negative_distances[4] == pytest.approx(445.21, rel=1e-6)


@pytest.mark.parametrize("strategy", ["semi-hard", "hard"])
def test_random_batches_match_the_oracle_and_never_use_the_anchors_own_pair(strategy):
    rng = np.random.default_rng(7)
    for pair_count in (2, 3, 5, 16):
        for _ in range(10):
            # Clustered points, so that every case of the rule occurs.
            anchors = rng.normal(size=(pair_count, 3)).astype(np.float32)
            positives = (anchors + rng.normal(scale=0.7, size=(pair_count, 3))).astype(np.float32)
            indices, _ = mining.select_negatives(anchors, positives, strategy)
            indices = ops.convert_to_numpy(indices)
            assert indices.tolist() == _oracle(anchors, positives, strategy)
            assert np.all(indices % pair_count != np.arange(pair_count))


def test_a_batch_of_one_pair_has_no_negative_and_costs_nothing():
    _, found = mining.select_negatives(_column([0.0]), _column([3.0]), "semi-hard")
    assert ops.convert_to_numpy(found).tolist() == [False]
    model = _dense_siamese_model("hard")
    batch = tuple(tf.constant(np.ones((1, 5), np.float32) * value) for value in (1, 2, 3))
    assert float(model._compute_triplet_loss(batch, training=True)) == 0.0


# ---------------------------------------------------------------------------
# The loss and its gradients: those of the explicitly built triplets
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["semi-hard", "hard"])
def test_mined_loss_and_gradients_equal_those_of_explicit_triplets(strategy):
    rng = np.random.default_rng(3)
    anchors = tf.Variable(rng.normal(size=(6, 4)).astype(np.float32))
    positives = tf.Variable((anchors.numpy() + rng.normal(scale=0.6, size=(6, 4))).astype("f"))
    chosen = _oracle(anchors.numpy(), positives.numpy(), strategy)
    distance_layer = tll.DistanceLayer()

    with tf.GradientTape(persistent=True) as tape:
        negatives, found = mining.mine_negatives(anchors, positives, strategy)
        mined = ops.mean(tll.triplet_loss(*distance_layer(anchors, positives, negatives), MARGIN))
        # The same triplets built by hand: negative k is anchor k, or positive k - 6.
        explicit_negatives = tf.stack(
            [anchors[k] if k < 6 else positives[k - 6] for k in chosen], axis=0
        )
        explicit = ops.mean(
            tll.triplet_loss(*distance_layer(anchors, positives, explicit_negatives), MARGIN)
        )
    assert ops.convert_to_numpy(found).all()
    assert float(mined) > 0
    assert float(mined) == pytest.approx(float(explicit), rel=1e-6)
    for variable in (anchors, positives):
        gradient = tape.gradient(mined, variable)
        expected = tape.gradient(explicit, variable)
        np.testing.assert_allclose(gradient.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    # The negatives' gradients reach the images they came from, not only the anchors.
    assert np.any(tape.gradient(mined, positives).numpy() != 0)


def _dense_siamese_model(negatives, seed=0):
    """The script's SiameseModel around a small dense embedding (no BatchNormalization)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    embedding = keras.Model(inputs, keras.layers.Dense(3, dtype="float32")(hidden))
    return tll.SiameseModel(tll.build_siamese_network(embedding), MARGIN, negatives)


@pytest.mark.parametrize("strategy", ["semi-hard", "hard"])
def test_the_training_steps_loss_and_gradients_equal_those_of_explicit_triplets(strategy):
    model = _dense_siamese_model(strategy)
    rng = np.random.default_rng(5)
    anchors = rng.normal(size=(8, 5)).astype(np.float32)
    positives = (anchors + rng.normal(scale=0.8, size=(8, 5))).astype(np.float32)
    # The dataset's random negative is ignored in mining modes: a constant one shows it.
    batch = (tf.constant(anchors), tf.constant(positives), tf.constant(np.zeros_like(anchors)))
    chosen = _oracle(model.embedding(anchors).numpy(), model.embedding(positives).numpy(), strategy)
    triplets = (batch[0], batch[1], tf.constant(np.concatenate([anchors, positives])[chosen]))
    weights = model.siamese_network.trainable_weights
    with tf.GradientTape(persistent=True) as tape:
        mined = model._compute_triplet_loss(batch, training=True)
        distances = model.siamese_network(list(triplets), training=True)
        explicit = ops.mean(tll.triplet_loss(*distances, MARGIN))
    assert float(mined) > 0
    assert float(mined) == pytest.approx(float(explicit), rel=1e-5)
    for gradient, expected in zip(
        tape.gradient(mined, weights), tape.gradient(explicit, weights), strict=True
    ):
        np.testing.assert_allclose(gradient.numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)


def test_the_training_step_uses_the_datasets_negatives_only_when_random():
    rng = np.random.default_rng(1)
    anchors, positives, negatives, other = (
        tf.constant(rng.normal(size=(4, 5)).astype(np.float32)) for _ in range(4)
    )
    losses = {}
    for strategy in ("random", "hard"):
        for name, negative in (("given", negatives), ("other", other)):
            model = _dense_siamese_model(strategy)
            model.compile(optimizer=keras.optimizers.SGD(0.1))
            # The step reports the loss of the weights it started from.
            batch = ((anchors, positives, negative),)  # a batch's one element: its triplet
            losses[strategy, name] = float(model.train_step(batch)["loss"])
    expected = _dense_siamese_model("random")._compute_triplet_loss(
        (anchors, positives, negatives), training=True
    )
    assert losses["random", "given"] == pytest.approx(float(expected), rel=1e-6)
    assert losses["random", "other"] != pytest.approx(losses["random", "given"])
    assert losses["hard", "other"] == pytest.approx(losses["hard", "given"], rel=1e-6)


# ---------------------------------------------------------------------------
# Mixed precision, XLA and tf.distribute
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["semi-hard", "hard"])
def test_mining_under_mixed_precision_chooses_in_float32_and_trains(mixed_precision, strategy):
    model = _dense_siamese_model(strategy)
    assert model.embedding.layers[1].compute_dtype == "float16"
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    rng = np.random.default_rng(2)
    batch = tuple(tf.constant(rng.normal(size=(8, 5)).astype(np.float16)) for _ in range(3))
    assert model.embedding(batch[0]).dtype == "float32"  # the distances are float32
    before = [weight.numpy().copy() for weight in model.siamese_network.trainable_weights]
    for _ in range(40):  # the loss scale may skip the first steps
        logs = model.train_step((batch,))
        assert logs["loss"].dtype == "float32" and np.isfinite(float(logs["loss"]))
    after = [weight.numpy() for weight in model.siamese_network.trainable_weights]
    assert any(not np.array_equal(b, a) for b, a in zip(before, after, strict=True))


def test_an_xla_compiled_mining_step_gives_the_same_loss():
    rng = np.random.default_rng(4)
    batch = tuple(rng.normal(size=(8, 5)).astype(np.float32) for _ in range(3))
    dataset = tf.data.Dataset.from_tensors((batch,))
    for strategy in ("semi-hard", "hard"):
        losses = []
        for jit_compile in (False, True):
            model = _dense_siamese_model(strategy)
            model.compile(keras.optimizers.SGD(0.1), jit_compile=jit_compile)
            history = model.fit(dataset, epochs=1, shuffle=False, verbose=0)
            assert model.jit_compile is jit_compile
            losses.append(history.history["loss"][0])
        assert losses[0] > 0
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)


# One SGD step mirrored over two logical CPU devices, against the same step computed by hand
# on one device with each replica's half of the batch mined on its own, and against mining
# over the whole batch (which must differ, or the check would prove nothing).
MIRRORED_MINING = textwrap.dedent(
    """
    import json
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import triplet_totally_looks_like as tll
    from triplet_totally_looks_like import keras, ops
    from siamese_support import devices, mining

    def model(strategy_name):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((5,))
        embedding = keras.Model(inputs, keras.layers.Dense(3)(inputs))
        return tll.SiameseModel(tll.build_siamese_network(embedding), 0.5, "hard"), embedding

    def mined_loss(embedding, anchors, positives):
        a, p = embedding(anchors), embedding(positives)
        n, _ = mining.mine_negatives(a, p, "hard")
        return ops.mean(tll.triplet_loss(*tll.DistanceLayer()(a, p, n), 0.5))

    rng = np.random.default_rng(0)
    batch = tuple(rng.normal(size=(8, 5)).astype("float32") for _ in range(3))
    strategy, line = devices.choose_strategy("mirrored")
    with strategy.scope():
        siamese_model, embedding = model("mirrored")
        siamese_model.compile(optimizer=keras.optimizers.SGD(0.5))
    siamese_model.fit(tf.data.Dataset.from_tensors((batch,)), epochs=1, verbose=0)
    mirrored = [w.numpy() for w in embedding.weights]

    results = {"line": line}
    for name, halves in (("per_replica", [slice(0, 4), slice(4, 8)]), ("whole", [slice(0, 8)])):
        _, embedding = model("none")
        with tf.GradientTape() as tape:
            loss = sum(mined_loss(embedding, batch[0][h], batch[1][h]) for h in halves)
            loss = loss / len(halves)
        gradients = tape.gradient(loss, embedding.weights)
        expected = [w.numpy() - 0.5 * g.numpy() for w, g in zip(embedding.weights, gradients)]
        results[name] = max(float(np.max(np.abs(m - e))) for m, e in zip(mirrored, expected))
    print("RESULTS " + json.dumps(results))
    """
)


@pytest.mark.slow
def test_under_mirrored_strategy_each_replica_mines_in_its_own_share(tmp_path):
    result = helpers.run(TRIPLET, [], tmp_path, python_code=MIRRORED_MINING)
    assert result.returncode == 0, describe(result)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    assert results["line"] == "Device: CPU, MirroredStrategy over 2 replicas"
    assert results["per_replica"] < 1e-5, results
    assert results["whole"] > 1e-3, results


# ---------------------------------------------------------------------------
# Choices and batch sizes
# ---------------------------------------------------------------------------


def test_the_choices_are_the_command_lines():
    assert command_line.NEGATIVES_CHOICES == ("random", "semi-hard", "hard")
    assert mining.MINED_NEGATIVES == ("semi-hard", "hard")
    parser = command_line.triplet_parser(tll.PARSER_DEFAULTS)
    assert parser.parse_args([]).negatives == "random"
    with pytest.raises(ValueError, match="negatives must be one of"):
        _dense_siamese_model("hardest")


def test_mining_needs_two_pairs_per_replica():
    mining.check_batch_size(1, 10, "random")
    mining.check_batch_size(2, 10, "semi-hard")
    mining.check_batch_size(4, 10, "hard", replicas=2)
    with pytest.raises(ValueError, match="--batch-size must be at least 2, got 1"):
        mining.check_batch_size(1, 10, "semi-hard")
    with pytest.raises(ValueError, match="on each of the 2 replicas: --batch-size must be at "):
        mining.check_batch_size(3, 10, "hard", replicas=2)
    with pytest.raises(ValueError, match="--batch-size 11 is larger than the 10 training pairs"):
        mining.check_batch_size(11, 10, "random")


# ---------------------------------------------------------------------------
# The real-image set: MNIST numbers in the Totally Looks Like layout
# ---------------------------------------------------------------------------


def test_number_pairs_are_distinct_numbers_in_distinct_handwriting():
    images, labels = real_pairs.load_digit_images()
    # Every MNIST image made distinct, to see which ones a pair uses.
    marked = images.astype(np.int64) * 0 + np.arange(len(images))[:, None, None]
    numbers, left, right = real_pairs.number_pairs(marked, labels, pairs=50, seed=1)
    assert len(set(numbers)) == 50 and all(len(number) == 4 for number in numbers)
    assert left.shape == right.shape == (50, 56, 56)
    used = []
    for number, *sides in zip(numbers, left, right, strict=True):
        for side in sides:
            # The four 28 x 28 cells, row by row: one MNIST image each, of the number's digits.
            cells = [
                side[row : row + 28, column : column + 28] for row in (0, 28) for column in (0, 28)
            ]
            indices = [int(cell[0, 0]) for cell in cells]
            assert all(np.all(cell == index) for cell, index in zip(cells, indices, strict=True))
            assert "".join(str(labels[index]) for index in indices) == number
            used += indices
    assert len(used) == len(set(used)) == 400  # no MNIST image is used twice
    with pytest.raises(ValueError, match="use fewer pairs"):
        real_pairs.number_pairs(images[:100], labels[:100], pairs=50)


def test_the_real_set_has_the_totally_looks_like_layout_and_its_licence(tmp_path):
    folder = real_pairs.make_real_dataset(tmp_path / "real", pairs=6, seed=2)
    names = [f"{index:05d}.png" for index in range(6)]
    assert sorted(path.name for path in (folder / "left").iterdir()) == names
    assert sorted(path.name for path in (folder / "right").iterdir()) == names
    image = tf.io.decode_png((folder / "left" / names[0]).read_bytes())
    assert image.shape == (56, 56, 1) and image.dtype == tf.uint8
    note = (folder / "README.txt").read_text()
    assert "Creative Commons Attribution-Share Alike 3.0" in note and "LeCun" in note
    assert len((folder / "numbers.csv").read_text().splitlines()) == 7


def test_the_tool_refuses_a_folder_that_holds_pairs(tmp_path):
    (tmp_path / "left").mkdir()
    result = helpers.run(TOOLS / "make_real_tll.py", [tmp_path], tmp_path, timeout=60)
    assert result.returncode == 2, describe(result)
    assert "already holds left/ or right/" in result.stderr.splitlines()[-1]


# ---------------------------------------------------------------------------
# The command line: each mode trains; training on real images raises triplet accuracy
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_pairs_dir(tmp_path_factory):
    return real_pairs.make_real_dataset(tmp_path_factory.mktemp("real"), pairs=40, seed=3)


# `random` trains too, for five epochs, in the last test.
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["semi-hard", "hard"])
def test_each_mining_mode_trains_an_epoch_on_real_images(
    tmp_path, real_pairs_dir, strategy, capsys
):
    arguments = ["--data-dir", real_pairs_dir, "--image-size", "32", "--batch-size", "8"]
    arguments += ["--epochs", "1", "--weights", "none", "--no-plots", "--negatives", strategy]
    result = helpers.run_main(tll, [*arguments, "--output-dir", tmp_path], tmp_path, capsys)
    assert result.returncode == 0, describe(result)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["negatives"] == strategy and metrics["epochs"] == 1
    assert metrics["training_pairs"] == 32 and metrics["cache_features"] is True
    history = (tmp_path / "history.csv").read_text().splitlines()
    assert len(history) == 2
    loss, val_loss = (float(value) for value in history[1].split(",")[1:3])
    assert np.isfinite(loss) and np.isfinite(val_loss) and val_loss > 0


@pytest.mark.slow
def test_training_on_real_images_raises_triplet_accuracy_on_the_validation_pairs(tmp_path, capsys):
    # The README's real-image set (300 pairs: 240 training, 60 validation) at 96 x 96 for
    # three epochs with the example's random negatives: measured 0.817 before, 0.850 after
    # (60 validation triplets, so 2 more right; five epochs reach 0.883, the last two taking
    # 10-30 s). With --seed 1, 2, 3 it rose too (0.683 -> 0.850, 0.733 -> 0.783,
    # 0.800 -> 0.900), and on the set of seed 1; --seed 4 starts at 0.900 and fell, at five
    # epochs as well. Smaller sets or images did not learn reliably from a random trunk
    # (64 x 64, five epochs: 0.883 -> 0.850).
    data_dir = real_pairs.make_real_dataset(tmp_path / "real300", pairs=300, seed=0)
    arguments = ["--data-dir", data_dir, "--image-size", "96", "--batch-size", "16"]
    arguments += ["--epochs", "3", "--weights", "none", "--no-plots", "--negatives", "random"]
    result = helpers.run_main(tll, [*arguments, "--output-dir", "run"], tmp_path, capsys)
    assert result.returncode == 0, describe(result)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["validation_pairs"] == 60 and metrics["negatives"] == "random"
    assert metrics["triplet_accuracy"] > metrics["triplet_accuracy_before"], metrics
