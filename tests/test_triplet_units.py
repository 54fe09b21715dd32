"""In-process tests of triplet_totally_looks_like.py: data, model, loss, training steps."""

import io
import os
import pathlib
import runpy

import numpy as np
import pytest
from helpers import TOOLS
from PIL import Image

import triplet_totally_looks_like as tll
from siamese_support import command_line, evaluation, image_folders, stores, synthetic
from triplet_totally_looks_like import keras, resnet, tf

SIZE = 32  # the smallest image ResNet50 accepts keeps these tests fast


def _random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _fake_pairs(count, prefix="/data"):
    anchors = [f"{prefix}/left/{index:05d}.jpg" for index in range(count)]
    positives = [f"{prefix}/right/{index:05d}.jpg" for index in range(count)]
    return anchors, positives


def _pair_number(filename):
    return int(pathlib.Path(filename).stem)


# ---------------------------------------------------------------------------
# Decoding: every common format, whatever the file is called
# ---------------------------------------------------------------------------


def _write_odd_image(kind, path, array):
    """Write `array` (uint8 RGB) to `path` in the file format `kind` names."""
    image = Image.fromarray(array)
    if kind == "jpeg":
        image.save(path, format="JPEG", quality=95)
    elif kind == "png_named_jpg":
        image.save(path, format="PNG")
    elif kind == "gif_named_jpg":
        image.save(path, format="GIF")
    elif kind == "bmp_named_jpg":
        image.save(path, format="BMP")
    elif kind == "grayscale_jpeg":
        image.convert("L").save(path, format="JPEG", quality=95)
    elif kind == "cmyk_jpeg":
        image.convert("CMYK").save(path, format="JPEG", quality=95)
    elif kind == "rgba_png":
        image.convert("RGBA").save(path, format="PNG")
    elif kind == "palette_png":
        image.convert("P").save(path, format="PNG")
    elif kind == "png16":
        gray16 = array[..., 0].astype(np.uint16) * 257
        Image.fromarray(gray16).save(path, format="PNG")
    else:
        raise AssertionError(kind)


ODD_KINDS = [
    "jpeg",
    "png_named_jpg",
    "gif_named_jpg",
    "bmp_named_jpg",
    "grayscale_jpeg",
    "cmyk_jpeg",
    "rgba_png",
    "palette_png",
    "png16",
]


@pytest.mark.parametrize("kind", ODD_KINDS)
def test_preprocess_image_reads_odd_but_valid_files(kind, tmp_path):
    # Flat colour blocks survive JPEG and GIF compression well enough to compare.
    array = np.zeros((SIZE, SIZE, 3), np.uint8)
    array[: SIZE // 2] = (200, 40, 90)
    array[SIZE // 2 :] = (20, 180, 240)
    path = tmp_path / ("image.png" if kind == "png16" else "image.jpg")
    _write_odd_image(kind, path, array)
    image = tll.preprocess_image(str(path), (SIZE, SIZE)).numpy()
    assert image.shape == (SIZE, SIZE, 3)
    assert image.dtype == np.float32
    # What Pillow makes of the same file, as 8-bit RGB.
    with Image.open(path) as reference_image:
        if reference_image.mode == "I;16":
            reference = np.repeat(array[..., :1], 3, axis=-1)
        else:
            reference = np.asarray(reference_image.convert("RGB"))
    # 0-255 scale (not [0, 1]), close to the pixel values Pillow decodes.
    assert image.max() > 100
    assert np.abs(image - reference.astype(np.float32)).mean() < 4.0


def test_sixteen_bit_png_is_scaled_to_0_255(tmp_path):
    values = np.array([[0, 1000, 32768, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    decoded = tll.decode_image(tf.io.read_file(str(tmp_path / "deep.png"))).numpy()
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[0, :, 0], [0, 3, 128, 255])


def test_exif_rotated_jpeg_loads_with_its_stored_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(_random_image(20, 40)).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    decoded = tll.decode_image(tf.io.read_file(str(tmp_path / "rotated.jpg")))
    # The tag is ignored, as documented: the stored 20 x 40 layout comes back.
    assert tuple(decoded.shape) == (20, 40, 3)
    assert tll.preprocess_image(str(tmp_path / "rotated.jpg"), (SIZE, SIZE)).shape == (
        SIZE,
        SIZE,
        3,
    )


@pytest.mark.parametrize("height, width", [(1, 1), (3, 500), (2400, 1800)])
def test_very_small_and_very_large_images_load(height, width, tmp_path):
    Image.fromarray(_random_image(height, width)).save(tmp_path / "x.jpg", quality=80)
    image = tll.preprocess_image(str(tmp_path / "x.jpg"), (SIZE, SIZE)).numpy()
    assert image.shape == (SIZE, SIZE, 3)
    assert 0 <= image.min() and image.max() <= 255


def _write_bad_files(folder):
    good = Image.fromarray(_random_image(SIZE, SIZE))
    buffer = io.BytesIO()
    good.save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    buffer = io.BytesIO()
    good.save(buffer, format="PNG")
    png = buffer.getvalue()
    files = {
        "good.jpg": jpeg,
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "text.jpg": b"this is not an image",
        "empty.jpg": b"",
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return [str(folder / name) for name in files]


def test_find_unreadable_images_names_every_bad_file(tmp_path):
    filenames = _write_bad_files(tmp_path)
    unreadable = image_folders.find_unreadable_images(filenames, tll.decode_image)
    assert set(unreadable) == set(filenames[1:])
    for reason in unreadable.values():
        assert reason and "{{" not in reason and "\n" not in reason


def test_drop_unreadable_pairs_skips_the_pair_and_warns(tmp_path, capsys):
    for side in ("left", "right"):
        (tmp_path / side).mkdir()
        for index in range(4):
            Image.fromarray(_random_image(SIZE, SIZE, index)).save(tmp_path / side / f"{index}.jpg")
    (tmp_path / "right" / "2.jpg").write_bytes(b"\xff\xd8\xff broken")
    anchors, positives = image_folders.find_image_pairs(tmp_path)
    kept_anchors, kept_positives, skipped = image_folders.drop_unreadable_pairs(
        anchors, positives, tll.decode_image
    )
    assert [pathlib.Path(name).name for name in kept_anchors] == ["0.jpg", "1.jpg", "3.jpg"]
    assert [pathlib.Path(name).name for name in kept_positives] == ["0.jpg", "1.jpg", "3.jpg"]
    assert skipped == ["2.jpg"]
    warning = capsys.readouterr().err
    assert str(tmp_path / "right" / "2.jpg") in warning
    assert warning.count("\n") == 1


# ---------------------------------------------------------------------------
# Pairs, split and negatives
# ---------------------------------------------------------------------------


def test_find_image_pairs_sorts_and_pairs_by_name(tmp_path):
    for side in ("left", "right"):
        (tmp_path / side).mkdir()
    for name in ("b", "a", "c"):
        (tmp_path / "left" / f"{name}.jpg").write_bytes(b"x")
        (tmp_path / "right" / f"{name}.png").write_bytes(b"x")
    (tmp_path / "left" / ".DS_Store").write_bytes(b"x")
    anchors, positives = image_folders.find_image_pairs(tmp_path)
    assert [pathlib.Path(name).name for name in anchors] == ["a.jpg", "b.jpg", "c.jpg"]
    assert [pathlib.Path(name).name for name in positives] == ["a.png", "b.png", "c.png"]


@pytest.mark.parametrize("count", [10, 11, 101])
def test_split_pairs_is_disjoint_complete_and_seeded(count):
    train, validation = tll.split_pairs(count, 0.2, seed=3)
    assert len(train) == round(count * 0.8)
    assert not set(train) & set(validation)
    assert sorted([*train, *validation]) == list(range(count))
    again_train, _ = tll.split_pairs(count, 0.2, seed=3)
    np.testing.assert_array_equal(train, again_train)


def test_split_pairs_refuses_a_side_with_fewer_than_two_pairs():
    with pytest.raises(ValueError, match="at least 2"):
        tll.split_pairs(4, 0.2)


@pytest.mark.parametrize("count", [2, 3, 7, 50])
def test_choose_negatives_never_picks_the_anchors_own_pair(count):
    for seed in range(20):
        negatives = tll.choose_negatives(count, seed)
        assert negatives.shape == (count,)
        assert negatives.min() >= 0 and negatives.max() < 2 * count
        assert np.all(negatives % count != np.arange(count))


def test_choose_negatives_uses_anchors_and_positives_of_every_other_pair():
    draws = np.concatenate([tll.choose_negatives(3, seed)[:1] for seed in range(400)])
    # Pair 0's negative: any of the four images of pairs 1 and 2.
    assert set(draws.tolist()) == {1, 2, 4, 5}


def _iterate_names(dataset):
    return [tuple(value.decode() for value in triplet) for triplet in dataset.as_numpy_iterator()]


def test_training_and_validation_triplets_stay_apart_over_epochs():
    anchors, positives = _fake_pairs(30)
    train_indices, val_indices = tll.split_pairs(len(anchors), 0.2, seed=1)
    train_anchors = [anchors[i] for i in train_indices]
    train_positives = [positives[i] for i in train_indices]
    val_anchors = [anchors[i] for i in val_indices]
    val_positives = [positives[i] for i in val_indices]
    train_set = tll.training_triplets(train_anchors, train_positives, seed=1)
    val_pool = val_anchors + val_positives
    val_set = tll.validation_triplet_indices(tll.choose_negatives(len(val_anchors), 1))
    train_pairs = {_pair_number(name) for name in train_anchors}
    val_pairs = {_pair_number(name) for name in val_anchors}
    orders, negative_draws, val_epochs = [], [], []
    for _ in range(4):
        train_epoch = _iterate_names(train_set)
        val_epoch = [
            tuple(val_pool[index] for index in triplet) for triplet in val_set.as_numpy_iterator()
        ]
        # Every training pair once per epoch; every image of every triplet from its side.
        assert sorted(_pair_number(a) for a, _, _ in train_epoch) == sorted(train_pairs)
        assert {_pair_number(name) for triplet in train_epoch for name in triplet} <= train_pairs
        assert {_pair_number(name) for triplet in val_epoch for name in triplet} <= val_pairs
        for anchor, positive, _ in train_epoch + val_epoch:
            assert pathlib.Path(anchor).parent.name == "left"
            assert pathlib.Path(positive).parent.name == "right"
            assert _pair_number(anchor) == _pair_number(positive)
        orders.append([a for a, _, _ in train_epoch])
        negative_draws.append(dict((a, n) for a, _, n in train_epoch))
        val_epochs.append(val_epoch)
    # Training reshuffles and redraws negatives every epoch; validation never changes.
    assert len({tuple(order) for order in orders}) > 1
    assert len({tuple(sorted(draw.items())) for draw in negative_draws}) > 1
    assert all(epoch == val_epochs[0] for epoch in val_epochs)


def test_training_negatives_never_come_from_the_anchors_pair():
    anchors, positives = _fake_pairs(6)
    dataset = tll.training_triplets(anchors, positives, seed=5)
    seen = set()
    for _ in range(25):
        for anchor, _, negative in _iterate_names(dataset):
            assert _pair_number(negative) != _pair_number(anchor)
            seen.add(negative)
    # Over many epochs both anchors and positives of other pairs serve as negatives.
    assert {pathlib.Path(name).parent.name for name in seen} == {"left", "right"}


# ---------------------------------------------------------------------------
# Distances, loss and evaluation against NumPy
# ---------------------------------------------------------------------------


def test_distance_layer_matches_numpy():
    rng = np.random.default_rng(0)
    anchor, positive, negative = (rng.normal(size=(5, 7)).astype("float32") for _ in range(3))
    ap_distance, an_distance = tll.DistanceLayer()(anchor, positive, negative)
    np.testing.assert_allclose(ap_distance, ((anchor - positive) ** 2).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(an_distance, ((anchor - negative) ** 2).sum(-1), rtol=1e-5)


def test_triplet_loss_matches_numpy():
    ap_distance = np.array([0.1, 2.0, 1.0, 0.0], np.float32)
    an_distance = np.array([3.0, 0.5, 1.2, 0.4], np.float32)
    expected = np.maximum(ap_distance - an_distance + 0.5, 0.0)
    np.testing.assert_allclose(tll.triplet_loss(ap_distance, an_distance, 0.5), expected)
    np.testing.assert_allclose(expected, [0.0, 2.0, 0.3, 0.1], rtol=1e-6)


def test_cosine_similarities_are_per_example():
    first = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    second = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(evaluation.cosine_similarities(first, second), [1.0, -1.0, 0.0])


def test_recall_at_k_counts_ties_against_the_right_answer():
    distances = np.array(
        [
            [0.0, 1.0, 2.0],  # right answer first
            [0.5, 1.0, 3.0],  # right answer second
            [1.0, 1.0, 1.0],  # all tied: ranked last
        ]
    )
    assert evaluation.recall_at_k(distances, ks=(1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}


def test_pairwise_squared_distances_match_numpy():
    rng = np.random.default_rng(1)
    first, second = rng.normal(size=(4, 3)), rng.normal(size=(6, 3))
    expected = ((first[:, None, :] - second[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(
        evaluation.pairwise_squared_distances(first, second), expected, atol=1e-9
    )


def test_evaluate_triplets_scores_every_fixed_triplet():
    anchors = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]], np.float32)
    positives = np.array([[0.1, 0.0], [1.0, 0.5], [3.0, 0.0]], np.float32)
    negative_indices = [4, 0, 1]  # into anchors + positives: pair 0's negative is positive 1
    result = evaluation.evaluate_triplets(anchors, positives, negative_indices)
    negatives = np.concatenate([anchors, positives])[negative_indices]
    ap_distances = ((anchors - positives) ** 2).sum(1)
    an_distances = ((anchors - negatives) ** 2).sum(1)
    np.testing.assert_allclose(result["ap_distances"], ap_distances, rtol=1e-6)
    np.testing.assert_allclose(result["an_distances"], an_distances, rtol=1e-6)
    # Triplet 2's positive is farther than its negative (18 against 10).
    assert result["triplet_accuracy"] == pytest.approx(2 / 3)
    # Anchor 2 finds positive 1 closer than its own positive.
    assert (result["recall_at_1"], result["recall_at_5"]) == (pytest.approx(2 / 3), 1.0)
    np.testing.assert_allclose(
        result["negative_similarities"], evaluation.cosine_similarities(anchors, negatives)
    )
    rows = evaluation.similarity_rows(
        ["/d/left/a.jpg", "/d/left/b.jpg", "/d/left/c.jpg"],
        ["/d/right/a.jpg", "/d/right/b.jpg", "/d/right/c.jpg"],
        negative_indices,
        "/d",
        result,
    )
    assert [row["negative"] for row in rows] == ["right/b.jpg", "left/a.jpg", "left/b.jpg"]
    assert rows[2]["positive_distance"] == "18" and rows[2]["negative_distance"] == "10"
    assert rows[0]["anchor"] == "a.jpg" and rows[0]["positive_similarity"] == "0.000000"


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedding():
    keras.utils.set_random_seed(0)
    return tll.build_embedding_network((SIZE, SIZE), weights=None)


def test_freezing_rule_layer_by_layer(embedding):
    base_cnn = embedding.get_layer("resnet50")
    names = [layer.name for layer in base_cnn.layers]
    first = names.index("conv5_block1_out")
    for index, layer in enumerate(base_cnn.layers):
        assert layer.trainable == (index >= first), layer.name
    head = embedding.layers[embedding.layers.index(base_cnn) + 1 :]
    assert [type(layer).__name__ for layer in head] == [
        "Flatten",
        "Dense",
        "BatchNormalization",
        "Dense",
        "BatchNormalization",
        "Dense",
    ]
    assert all(layer.trainable for layer in head)
    resnet_trainable = {weight.path.split("/")[-2] for weight in base_cnn.trainable_weights}
    assert resnet_trainable and all(
        name.startswith(("conv5_block2", "conv5_block3")) for name in resnet_trainable
    )
    assert embedding.output.shape[-1] == 256
    assert embedding.name == "Embedding"


def test_model_input_is_preprocess_input_of_the_uint8_image(embedding, tmp_path):
    pixels = _random_image(SIZE, SIZE, seed=7)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    image = tll.preprocess_image(str(tmp_path / "image.png"), (SIZE, SIZE))
    # The pipeline hands the model pixel values 0-255, unchanged.
    np.testing.assert_array_equal(image.numpy(), pixels.astype(np.float32))
    preprocessing = keras.Model(embedding.input, embedding.get_layer("resnet_preprocessing").output)
    seen_by_resnet = preprocessing(image[None]).numpy()[0]
    expected = resnet.preprocess_input(pixels.astype(np.float32))
    np.testing.assert_allclose(seen_by_resnet, expected, atol=1e-4)
    # Caffe-style: BGR channel order with the ImageNet means subtracted.
    np.testing.assert_allclose(seen_by_resnet[0, 0, 0], pixels[0, 0, 2] - 103.939, atol=1e-3)


def test_split_embedding_network_composes_to_the_embedding(embedding):
    trunk, tail = stores.split_at_layer(embedding, "resnet50", tll.first_trainable_layer)
    images = _random_image(SIZE, SIZE)[None].astype("float32")
    expected = embedding(images, training=False)
    np.testing.assert_allclose(tail(trunk(images), training=False), expected, rtol=1e-4, atol=1e-4)
    assert not trunk.trainable_weights or all(not weight.trainable for weight in trunk.weights)
    assert len(tail.trainable_weights) == len(embedding.trainable_weights)


def _siamese_model(seed=0, learning_rate=1e-3):
    keras.utils.set_random_seed(seed)
    embedding = tll.build_embedding_network((SIZE, SIZE), weights=None)
    siamese_model = tll.SiameseModel(tll.build_siamese_network(embedding))
    siamese_model.compile(optimizer=keras.optimizers.Adam(learning_rate))
    return siamese_model, embedding


def _fixed_batch(count=4, seed=0):
    rng = np.random.default_rng(seed)
    anchor = rng.uniform(0, 255, (count, SIZE, SIZE, 3)).astype("float32")
    # Negatives almost equal to their anchors and unrelated positives: every triplet is
    # violated, so the loss starts well above zero.
    negative = np.clip(anchor + rng.normal(0, 5, anchor.shape), 0, 255).astype("float32")
    positive = rng.uniform(0, 255, anchor.shape).astype("float32")
    return tf.constant(anchor), tf.constant(positive), tf.constant(negative)


def _snapshot(variables):
    return [np.array(variable.numpy()) for variable in variables]


@pytest.mark.slow
def test_train_step_lowers_the_loss_on_a_fixed_batch():
    siamese_model, _ = _siamese_model()
    batch = _fixed_batch()
    losses = []
    for _ in range(6):
        siamese_model.loss_tracker.reset_state()
        losses.append(float(siamese_model.train_step((batch,))["loss"]))
    assert losses[0] > 0
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_test_step_changes_no_weight_and_batchnorm_statistics_move_in_train_step_only():
    siamese_model, embedding = _siamese_model(seed=1)
    batch = _fixed_batch(seed=1)
    base_cnn = embedding.get_layer("resnet50")
    head_norms = [
        layer for layer in embedding.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    trainable_resnet_norm = base_cnn.get_layer("conv5_block3_3_bn")
    frozen_norms = [base_cnn.get_layer("conv1_bn"), base_cnn.get_layer("conv5_block1_0_bn")]

    def statistics(norms):
        return _snapshot([v for norm in norms for v in (norm.moving_mean, norm.moving_variance)])

    all_weights = _snapshot(siamese_model.siamese_network.weights)
    siamese_model.test_step((batch,))
    for before, after in zip(
        all_weights, _snapshot(siamese_model.siamese_network.weights), strict=True
    ):
        np.testing.assert_array_equal(before, after)

    movable = statistics(head_norms + [trainable_resnet_norm])
    frozen = statistics(frozen_norms)
    trainable = _snapshot(siamese_model.siamese_network.trainable_weights)
    siamese_model.train_step((batch,))
    moved = statistics(head_norms + [trainable_resnet_norm])
    for before, after in zip(movable, moved, strict=True):
        assert not np.allclose(before, after)
    for before, after in zip(frozen, statistics(frozen_norms), strict=True):
        np.testing.assert_array_equal(before, after)
    changed = [
        not np.array_equal(before, after)
        for before, after in zip(
            trainable, _snapshot(siamese_model.siamese_network.trainable_weights), strict=True
        )
    ]
    assert all(changed)


# ---------------------------------------------------------------------------
# Weights files
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_local_weights_file_is_loaded(tmp_path):
    keras.utils.set_random_seed(11)
    source = resnet.ResNet50(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
    path = tmp_path / "resnet50_notop.weights.h5"
    source.save_weights(path)
    loaded = tll.build_embedding_network((SIZE, SIZE), str(path)).get_layer("resnet50")
    for expected, actual in zip(source.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(expected.numpy(), actual.numpy())


def test_incompatible_or_missing_weights_file_raise_value_error(tmp_path):
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    other.save_weights(tmp_path / "other.weights.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    for name in ("other.weights.h5", "junk.h5"):
        with pytest.raises(ValueError, match="cannot load it into ResNet50"):
            tll.build_embedding_network((SIZE, SIZE), str(tmp_path / name))
    with pytest.raises(ValueError, match="no such file"):
        tll.build_embedding_network((SIZE, SIZE), str(tmp_path / "missing.h5"))


def test_imagenet_download_failure_raises_download_error(monkeypatch):
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(command_line.DownloadError, match="--weights none"):
        tll.build_embedding_network((SIZE, SIZE), "imagenet")


# ---------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------


def test_synthetic_pairs_look_alike_more_than_other_pairs(tmp_path):
    synthetic.make_synthetic_dataset(tmp_path, pairs=12, image_size=40, seed=3)
    anchors, positives = image_folders.find_image_pairs(tmp_path)
    assert len(anchors) == 12
    assert not image_folders.find_unreadable_images(anchors + positives, tll.decode_image)
    left = np.stack([np.asarray(Image.open(name), np.float32) for name in anchors])
    right = np.stack([np.asarray(Image.open(name), np.float32) for name in positives])
    assert left.shape == (12, 40, 40, 3)
    # Mean colour per image: partners are closer than non-partners on average.
    distances = evaluation.pairwise_squared_distances(
        left.mean(axis=(1, 2)), right.mean(axis=(1, 2))
    )
    partner = np.diag(distances).mean()
    others = distances[~np.eye(12, dtype=bool)].mean()
    assert partner < 0.5 * others
    # The generator is deterministic for a seed.
    synthetic.make_synthetic_dataset(tmp_path / "again", pairs=12, image_size=40, seed=3)
    assert (tmp_path / "again" / "left" / "00005.jpg").read_bytes() == pathlib.Path(
        anchors[5]
    ).read_bytes()


def test_make_synthetic_tll_tool(tmp_path):
    tool = runpy.run_path(str(TOOLS / "make_synthetic_tll.py"))  # its definitions, not its run
    assert tool["main"](["--pairs", "5", "--image-size", "24", str(tmp_path / "d")]) == 0
    assert len(os.listdir(tmp_path / "d" / "left")) == 5
    assert len(os.listdir(tmp_path / "d" / "right")) == 5
