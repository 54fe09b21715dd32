"""Image similarity with a Siamese network and a triplet loss, on Totally Looks Like (Keras 3).

A port of the keras.io example "Image similarity estimation using a Siamese Network with a
triplet loss" (2021). Three copies of one embedding network (a ResNet50 pretrained on
ImageNet, frozen up to `conv5_block1_out`, with a small dense head) read an anchor image, a
positive image that people judged to look like it, and a negative image from another pair.
The FaceNet triplet loss max(|f(A) - f(P)|^2 - |f(A) - f(N)|^2 + margin, 0) pulls the
positive closer to the anchor than the negative. The data is the Totally Looks Like dataset
(Rosenfeld, Solbach & Tsotsos 2018): 6,016 pairs of images in two folders, `left/` and
`right/`, whose sorted file names match pair by pair. The example reports val_loss 0.2841
after 10 epochs.

The definitions follow the example's sections, in its order; `main()` at the end runs its steps.
The port's additions (stored data, metrics, plots, resuming, devices) are in `siamese_support`.

    python triplet_totally_looks_like.py                     # the example: download, 10 epochs
    python triplet_totally_looks_like.py --data-dir DIR --weights none   # fully offline
    python triplet_totally_looks_like.py --dry-run           # tiny generated data, 1 epoch
    KERAS_BACKEND=jax python triplet_totally_looks_like.py   # JAX or PyTorch, without TensorFlow
"""

import functools
import os
import pathlib
import sys

from siamese_support import command_line, devices, downloads, evaluation, image_folders, synthetic

# Ctrl-C in the first seconds, while Keras loads, gives one line too (main() says the rest).
command_line.quiet_interrupts_outside_main(__name__, "triplet_totally_looks_like.py")
import numpy as np

# --- Setup --------------------------------------------------------------------------------

target_shape = (200, 200)
# The example's other settings, named so that the command line can change them.
batch_size = 32
epochs = 10
margin = 0.5
learning_rate = 0.0001
validation_split = 0.2
# The example seeds only its file shuffles; this port seeds everything, for reproducibility.
seed = 42
minimum_image_size = 32  # the smallest input ResNet50 without its top accepts
# The layer from which the example trains ResNet50; everything before it stays frozen.
first_trainable_layer = "conv5_block1_out"
# `--dry-run`: generated pairs, small images, one epoch, no pretrained weights.
dry_run_pairs = 48
dry_run_image_size = 64
dry_run_epochs = 1
# Training steps per compiled call: on a CPU (a step takes 0.2 s or more), on a GPU.
steps_per_execution = (1, 8)

# The command line's defaults: the example's.
PARSER_DEFAULTS = dict(epochs=epochs, batch_size=batch_size, margin=margin, seed=seed)
PARSER_DEFAULTS.update(learning_rate=learning_rate, validation_split=validation_split)
PARSER_DEFAULTS.update(image_size=target_shape[0], minimum_image_size=minimum_image_size)
PARSER_DEFAULTS.update(dry_run_pairs=dry_run_pairs, dry_run_epochs=dry_run_epochs)
PARSER_DEFAULTS.update(dry_run_image_size=dry_run_image_size)
PARSER_DEFAULTS["steps_per_execution"] = steps_per_execution

if __name__ == "__main__":
    # --help and mistakes answer here, before Keras imports TensorFlow (about 5 s).
    command_line.parse_triplet_command(None, PARSER_DEFAULTS)

devices.require_backend("triplet_totally_looks_like.py")  # installed, and one that trains
with devices.quiet_tensorflow_start():
    import keras
    from keras import layers, ops
    from keras.applications import resnet

    if keras.backend.backend() == "tensorflow":  # tf.data, GradientTape; not JAX or PyTorch
        import tensorflow as tf

from siamese_support import gallery, mining, pillow_images, plots, progress, run_folder, stores

# --- Load the dataset ---------------------------------------------------------------------

# The example's two Google Drive files, unpacked into ~/.keras/left and ~/.keras/right.
cache_dir = pathlib.Path.home() / ".keras"
google_drive_ids = {"left": "1jvkbTr_giSP3Ru8OwGNCg6B4PvVbcO34"}
google_drive_ids["right"] = "1EzBZUb_mh_Dp_FKD0P4XiYYSd0QBH5zW"


def load_dataset(data_dir, dry_run, seed, make_folder):
    """The dataset's folder: `data_dir`, generated pairs in `make_folder()` for a dry run, or
    the download (the example's gdown and unzip into `cache_dir`)."""
    if data_dir is None and dry_run:
        data_dir = make_folder()
        synthetic.make_synthetic_dataset(data_dir, dry_run_pairs, seed=seed)
    return data_dir or downloads.download_dataset(cache_dir, google_drive_ids)


# --- Prepare the data ---------------------------------------------------------------------


def decode_image(image_string):
    """Decode JPEG, PNG, GIF or BMP bytes to a uint8 RGB image, whatever the file's name.

    The example's `decode_jpeg` fails on PNG or GIF content behind a `.jpg` name. Grayscale
    and palette images get three channels, CMYK JPEGs are converted to RGB by the decoder,
    16-bit PNGs are scaled to 0-255 (`dtype=uint8`), an animated GIF gives its first frame.
    EXIF orientation tags are ignored, as in the example. (JAX, PyTorch: Pillow, the same way.)
    """
    if keras.backend.backend() != "tensorflow":
        return pillow_images.decode_image(image_string)
    return tf.io.decode_image(image_string, channels=3, dtype=tf.uint8, expand_animations=False)


def preprocess_image(filename, image_size=target_shape):
    """Load an image file as float32 pixel values 0-255, resized to `image_size`.

    The example scales to [0, 1] before `resnet.preprocess_input`, which expects 0-255
    (it subtracts the ImageNet channel means in that scale): the pretrained weights then
    see almost constant images. The values stay 0-255 here.
    """
    if keras.backend.backend() != "tensorflow":  # Pillow and NumPy give the same pixels
        return pillow_images.read_image(filename, image_size)
    image_string = tf.io.read_file(filename)
    image = decode_image(image_string)
    image = tf.cast(image, tf.float32)
    image = tf.image.resize(image, image_size)
    return image


def preprocess_triplets(anchor, positive, negative, image_size=target_shape):
    """Load the three image files of a triplet."""
    return (
        preprocess_image(anchor, image_size),
        preprocess_image(positive, image_size),
        preprocess_image(negative, image_size),
    )


def split_pairs(pair_count, validation_split=validation_split, seed=seed):
    """Indices of the training and the validation pairs, each sorted.

    The example shuffles the triplets, reshuffled on every iteration, and then splits them
    with `take`/`skip`: every epoch validates on other pairs, most of them trained on
    before. Here the pairs are split once, by a seeded permutation, before anything is
    shuffled. Each side needs two pairs: a negative comes from another pair of its side.
    """
    train_count = round(pair_count * (1 - validation_split))
    if train_count < 2 or pair_count - train_count < 2:
        raise ValueError(
            f"{pair_count} pairs split {validation_split:g} for validation leave "
            f"{train_count} training and {pair_count - train_count} validation pairs; each "
            "side needs at least 2 (use more pairs, or change --limit or --validation-split)"
        )
    order = np.random.default_rng(seed).permutation(pair_count)
    return np.sort(order[:train_count]), np.sort(order[train_count:])


def choose_negatives(pair_count, rng):
    """For pair i, the index of a negative image in `anchors + positives`, never of pair i.

    The example draws negatives from all images, so a negative can be the anchor itself or
    its own positive, which teaches the model the opposite of the truth. Indices below
    `pair_count` are anchors, the others positives; each other image is equally likely.
    """
    if pair_count < 2:
        raise ValueError("choose_negatives needs at least two pairs")
    rng = np.random.default_rng(rng)
    other_pair = rng.integers(0, pair_count - 1, size=pair_count)
    # Shift the draws at or above i by one: pair i itself is never chosen.
    other_pair += other_pair >= np.arange(pair_count)
    side = rng.integers(0, 2, size=pair_count)
    return other_pair + side * pair_count


def prepare_pairs(data_dir, limit=None, validation_split=validation_split, seed=seed):
    """The example's sorted file lists, split once (`split_pairs`), with validation negatives:
    `(train anchors, positives)`, `(val anchors, positives, negatives)`, the pairs skipped."""
    anchor_images, positive_images, skipped = image_folders.load_pairs(
        data_dir, limit, decode_image
    )
    train_pairs, val_pairs = split_pairs(len(anchor_images), validation_split, seed)
    train, val = (
        [[files[i] for i in pairs] for files in (anchor_images, positive_images)]
        for pairs in (train_pairs, val_pairs)
    )
    print(f"{len(train_pairs)} training pairs, {len(val_pairs)} validation pairs", flush=True)
    return train, (*val, choose_negatives(len(val_pairs), seed)), skipped


def training_triplet_indices(pair_count, seed=seed):
    """A `tf.data` dataset of (anchor, positive, negative) indices into `anchors + positives`.
    Pair i is (i, pair_count + i). The pairs are reshuffled every epoch and every anchor
    gets a new negative every epoch, by the rule of `choose_negatives`."""
    if pair_count < 2:
        raise ValueError("training needs at least two pairs")
    if keras.backend.backend() != "tensorflow":  # JAX, PyTorch: a function of the epoch
        return functools.partial(epoch_triplet_indices, pair_count, seed=seed)
    pairs = tf.data.Dataset.range(pair_count)
    pairs = pairs.shuffle(pair_count, seed=seed, reshuffle_each_iteration=True)
    random_numbers = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

    def add_negative(index, random_number):
        # The same rule as `choose_negatives`, from one random integer per triplet.
        other_pair = tf.math.floormod(random_number // 2, pair_count - 1)
        other_pair += tf.cast(other_pair >= index, tf.int64)
        side = tf.math.floormod(random_number, 2)
        return index, index + pair_count, other_pair + side * pair_count

    dataset = tf.data.Dataset.zip(pairs, random_numbers)
    return dataset.map(add_negative, num_parallel_calls=tf.data.AUTOTUNE)


def epoch_triplet_indices(pair_count, epoch, seed=seed):
    """`training_triplet_indices`' rules in NumPy (JAX, PyTorch): epoch `epoch`'s 3 arrays."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(pair_count)
    return order, order + pair_count, choose_negatives(pair_count, rng)[order]


def training_triplets(anchor_images, positive_images, seed=seed):
    """A `tf.data` dataset of (anchor, positive, negative) file names for training.
    The pairs are reshuffled every epoch and every anchor gets a new negative every epoch,
    drawn from the other training pairs only (validation images never appear here)."""
    if len(anchor_images) != len(positive_images):
        raise ValueError("training_triplets needs as many anchors as positives")
    pool = list(anchor_images) + list(positive_images)
    if keras.backend.backend() != "tensorflow":  # the first epoch's, as a list
        triplets = epoch_triplet_indices(len(anchor_images), 0, seed)
        return [tuple(pool[index] for index in triplet) for triplet in zip(*triplets, strict=True)]
    pool = tf.constant(pool)
    return training_triplet_indices(len(anchor_images), seed).map(
        lambda *triplet: tuple(tf.gather(pool, index) for index in triplet),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def validation_triplet_indices(negative_indices):
    """A `tf.data` dataset of the fixed validation triplets as indices, in order.
    Pair i is (i, pair_count + i), with the negative `negative_indices[i]` chosen once
    (`choose_negatives`): every epoch's val_loss is measured on the same triplets."""
    negative_indices = np.asarray(negative_indices, np.int64)
    pair_count = len(negative_indices)
    triplets = (np.arange(pair_count), np.arange(pair_count) + pair_count, negative_indices)
    if keras.backend.backend() != "tensorflow":  # the three arrays, for JAX and PyTorch
        return triplets
    return tf.data.Dataset.from_tensor_slices(triplets)


def make_dataset(triplet_files, image_size=target_shape, batch_size=batch_size):
    """Decode the triplets' images and batch them, as the example does.

    Training reads them as rows of images decoded once (`stored_datasets`); this pipeline
    feeds `visualize` and the benchmarks (under JAX and PyTorch, batches of NumPy arrays)."""
    load_triplet = functools.partial(preprocess_triplets, image_size=image_size)
    if keras.backend.backend() != "tensorflow":  # NumPy batches, for JAX and PyTorch
        return stores.numpy_image_batches(triplet_files, load_triplet, batch_size)
    dataset = triplet_files.map(load_triplet, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=False)
    return dataset.prefetch(tf.data.AUTOTUNE)


def visualize(anchor, positive, negative, path):
    """Draw three triplets in a 3 x 3 grid (anchor, positive, negative per row) as a PNG.

    The images are 0-255 float arrays as `preprocess_image` returns them. The example shows
    the grid inline; a script writes it to `path`.
    """
    figure = plots.pyplot().figure(figsize=(9, 9))
    axes = figure.subplots(3, 3)
    for column, title in enumerate(("anchor", "positive", "negative")):
        axes[0, column].set_title(title)
    for row in range(3):
        for column, images in enumerate((anchor, positive, negative)):
            axis = axes[row, column]
            axis.set_axis_off()
            if row < len(images):
                axis.imshow(np.clip(np.asarray(images[row]) / 255.0, 0.0, 1.0))
    figure.tight_layout()
    plots.save_figure(figure, path, dpi=90)


# --- Setting up the embedding generator model ---------------------------------------------


@keras.saving.register_keras_serializable(package="triplet_totally_looks_like")
class ResNetPreprocessing(layers.Layer):
    """`resnet.preprocess_input` as a layer: 0-255 RGB to ResNet50's BGR, mean-centred. A
    layer instead of a `Lambda`, so the saved embedding model reloads in safe mode."""

    def call(self, inputs):
        return resnet.preprocess_input(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape


def set_trainable_layers(base_cnn, first_trainable=first_trainable_layer):
    """Freeze every layer of `base_cnn` before `first_trainable`; train it and the rest.

    A frozen BatchNormalization layer also runs in inference mode in Keras 3, so the frozen
    part computes the same features for an image in every epoch."""
    if first_trainable not in [layer.name for layer in base_cnn.layers]:
        raise ValueError(f"{base_cnn.name} has no layer named {first_trainable}")
    trainable = False
    for layer in base_cnn.layers:
        if layer.name == first_trainable:
            trainable = True
        layer.trainable = trainable


def build_embedding_network(image_size=target_shape, weights="imagenet", normalize=False):
    """The example's embedding model, named "Embedding", taking 0-255 RGB images.

    ResNet50 (frozen before `conv5_block1_out`) -> Flatten -> Dense(512, relu) -> BatchNorm
    -> Dense(256, relu) -> BatchNorm -> Dense(256). The example applies `preprocess_input` in
    the Siamese network; here it is the embedding model's first layer, so the saved model
    takes plain images (`stores.split_at_layer` cuts it into frozen trunk and trainable tail).
    `weights`: "imagenet", None or a local weights file; failures are one clear error."""
    input_shape = tuple(image_size) + (3,)
    weights = downloads.weights_choice(weights, "ResNet50")
    with downloads.weights_errors(weights, "ResNet50", include_top=False):
        base_cnn = resnet.ResNet50(weights=weights, input_shape=input_shape, include_top=False)
    set_trainable_layers(base_cnn)

    inputs = keras.Input(shape=input_shape, name="image")
    preprocessed = ResNetPreprocessing(name="resnet_preprocessing")(inputs)
    flatten = layers.Flatten()(base_cnn(preprocessed))
    dense1 = layers.Dense(512, activation="relu")(flatten)
    dense1 = layers.BatchNormalization()(dense1)
    dense2 = layers.Dense(256, activation="relu")(dense1)
    dense2 = layers.BatchNormalization()(dense2)
    # float32 even under mixed precision: the embeddings and their distances stay exact.
    output = layers.Dense(256, dtype="float32")(dense2)
    if normalize:  # --normalize, an addition: FaceNet's unit-length embeddings (margin 0.2)
        output = layers.UnitNormalization(dtype="float32")(output)
    embedding = keras.Model(inputs, output, name="Embedding")
    return embedding


# --- Setting up the Siamese Network model -------------------------------------------------


@keras.saving.register_keras_serializable(package="triplet_totally_looks_like")
class DistanceLayer(layers.Layer):
    """The squared L2 distances anchor-positive and anchor-negative, one per triplet."""

    def call(self, anchor, positive, negative):
        ap_distance = ops.sum(ops.square(anchor - positive), -1)
        an_distance = ops.sum(ops.square(anchor - negative), -1)
        return (ap_distance, an_distance)


def build_siamese_network(embedding):
    """Three inputs, one shared embedding model, the two distances as output.
    The inputs have the shape the embedding model takes: images, or for its trainable tail
    (`stores.split_at_layer`), the frozen trunk's features."""
    input_shape = tuple(embedding.input.shape[1:])
    anchor_input = keras.Input(name="anchor", shape=input_shape)
    positive_input = keras.Input(name="positive", shape=input_shape)
    negative_input = keras.Input(name="negative", shape=input_shape)
    # float32 under mixed precision too (it casts its inputs): float16 squares overflow early.
    distances = DistanceLayer(name="distances", dtype="float32")(
        embedding(anchor_input), embedding(positive_input), embedding(negative_input)
    )
    siamese_network = keras.Model(
        [anchor_input, positive_input, negative_input], distances, name="siamese_network"
    )
    return siamese_network


# --- Putting everything together ----------------------------------------------------------


def stored_datasets(embedding, train_pairs, validation, image_size, batch_size, options):
    """Training and validation datasets of images or features stored once (`stores`).

    The example decodes every triplet's images every epoch, and runs all of ResNet50 each step.
    Here each image is decoded once and (`cache_features`) goes through the frozen trunk once;
    the tail (`network`) trains on the stored features. `options`: `(cache_features, cache_folder,
    seed, share)`. Returns network, datasets, val_store, seconds_caching."""
    cache_features, cache_folder, seed, share = options
    val_anchors, val_positives, val_negatives = validation
    files = (train_pairs[0] + train_pairs[1], val_anchors + val_positives)
    trunk, network = None, embedding
    if cache_features:
        trunk, network = stores.split_at_layer(embedding, "resnet50", first_trainable_layer)
    load_image = functools.partial(preprocess_image, image_size=image_size)
    (train_store, val_store), seconds_caching = stores.cache_inputs(
        files, load_image, image_size, batch_size, cache_folder, trunk
    )
    train_triplets = training_triplet_indices(len(files[0]) // 2, seed)
    train_dataset = stores.make_store_dataset(train_store, train_triplets, batch_size, share)
    val_triplets = validation_triplet_indices(val_negatives)
    val_dataset = stores.make_store_dataset(val_store, val_triplets, batch_size, share)
    return network, train_dataset, val_dataset, val_store, seconds_caching


def triplet_loss(ap_distance, an_distance, margin=margin):
    """Per-triplet loss max(d(A, P) - d(A, N) + margin, 0), with squared L2 distances."""
    return ops.maximum(ap_distance - an_distance + margin, 0.0)


class SiameseModel(keras.Model):
    """The Siamese network with a custom training loop for the triplet loss.

    The example's `_compute_loss` is `_compute_triplet_loss` here: Keras 3 models have a
    method of the example's name that this one would shadow. The loss is the mean over the
    batch (the example differentiates the per-triplet vector, i.e. its sum: with Adam the
    difference is only a constant factor on the gradient). `negatives` "semi-hard", "hard":
    mined in the batch (in each of its `groups` shares)."""

    def __init__(self, siamese_network, margin=margin, negatives="random", groups=1, **kwargs):
        super().__init__(**kwargs)
        self.siamese_network = siamese_network
        self.margin = margin
        self.negatives, self.groups = mining.checked_strategy(negatives), groups
        # The Siamese network's shared embedding network and distance layer, for mining.
        self.embedding = next(x for x in siamese_network.layers if isinstance(x, keras.Model))
        self.distance_layer = siamese_network.get_layer("distances")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.built = True  # its functional network is; BackupAndRestore refuses one that is not

    def call(self, inputs, training=False):
        anchor, positive, negative = inputs
        if training and self.negatives != "random":  # `compute_loss` mines among these
            return self.embedding(anchor, training=True), self.embedding(positive, training=True)
        return self.siamese_network([anchor, positive, negative], training=training)

    # Two paths, one loss. Under TensorFlow, the example's own steps with tf.GradientTape.
    # JAX has no tape (its step is a pure function of the variables) and PyTorch records its
    # own graph: there Keras's default steps run. Both call `compute_loss` on `call`'s outputs.
    if keras.backend.backend() == "tensorflow":

        def train_step(self, data):
            (triplet,) = data  # batches are ((anchor, positive, negative),) on every backend
            # GradientTape records the forward pass, to differentiate the loss afterwards.
            with tf.GradientTape() as tape:
                loss = self._compute_triplet_loss(triplet, training=True)
                # Under tf.distribute each replica has a slice of the batch and the gradients
                # are summed over replicas: dividing each replica's mean by their number makes
                # the sum the gradient of the mean over the global batch.
                replicas = self.distribute_strategy.num_replicas_in_sync
                # Under mixed precision the optimizer is a LossScaleOptimizer: the scaled loss
                # keeps float16 gradients from underflowing, and apply_gradients unscales them.
                scaled_loss = self.optimizer.scale_loss(loss / replicas)
            trainable_weights = self.siamese_network.trainable_weights
            gradients = tape.gradient(scaled_loss, trainable_weights)
            self.optimizer.apply_gradients(zip(gradients, trainable_weights, strict=True))
            return {"loss": self.loss_tracker.result()}  # updated by `compute_loss`

        def test_step(self, data):
            (triplet,) = data
            self._compute_triplet_loss(triplet, training=False)
            return {"loss": self.loss_tracker.result()}

    def _compute_triplet_loss(self, triplet, training):
        # The example calls the network without `training`; the head's BatchNormalization
        # layers must use batch statistics (and update their averages) in training only.
        y_pred = self(triplet, training=training)
        return self.compute_loss(triplet, y_pred=y_pred, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The batch's mean triplet loss from `call`'s outputs `y_pred`, on every backend.

        It reads only `y_pred` (JAX runs it without the layers' state); `sample_weight` 0
        marks padding. As Keras's documentation of this hook does, it updates the tracker.
        """
        if training and self.negatives != "random":
            # Mined online, as in FaceNet: each anchor's negative is an image of another pair
            # of its share of the batch, chosen on this step's embeddings, not the dataset's.
            anchor, positive = y_pred
            negative, found = mining.mine_negatives(anchor, positive, self.negatives, self.groups)
            ap_distance, an_distance = self.distance_layer(anchor, positive, negative)
            # A pair alone in its (last, short) batch has no negative there: it costs nothing.
            losses = ops.where(found, triplet_loss(ap_distance, an_distance, self.margin), 0.0)
        else:  # the dataset's negatives; the distances are float32 (`build_siamese_network`)
            losses = triplet_loss(*y_pred, self.margin)
        weights = ops.ones_like(losses) if sample_weight is None else sample_weight
        loss = ops.sum(losses * weights) / ops.sum(weights)
        self.loss_tracker.update_state(loss)
        return loss

    @property
    def metrics(self):
        # Listed here so that Keras resets the tracker at the start of every epoch.
        return [self.loss_tracker]


# --- Training -----------------------------------------------------------------------------


def train(siamese_model, train_dataset, val_dataset, epochs, learning_rate, compiling, callbacks):
    """The example's training: Adam, `fit`, validation. `compiling`: XLA as `--jit-compile`
    says, or as Keras decides (None); training steps per compiled call."""
    jit_compile, steps = compiling
    jit = "auto" if jit_compile is None else jit_compile
    siamese_model.compile(
        keras.optimizers.Adam(learning_rate), jit_compile=jit, steps_per_execution=steps
    )
    # Adam's slots now: made in the first trace of `train_step`, they make TensorFlow trace
    # it twice (3 s of a dry run). Keras builds them so under JAX and tf.distribute already.
    siamese_model.optimizer.build(siamese_model.siamese_network.trainable_weights)
    # shuffle=False: the dataset reshuffles itself every epoch.
    options = dict(callbacks=list(callbacks), shuffle=False, verbose=progress.fit_verbosity())
    return siamese_model.fit(train_dataset, epochs=epochs, validation_data=val_dataset, **options)


# --- Inspecting what the network has learned ----------------------------------------------


def evaluate_embeddings(network, val_store, val_negatives, batch_size=batch_size):
    """Cosine similarities, distances, triplet accuracy and recall on the validation pairs.
    The example prints the mean cosine similarities of one training batch's anchors to its
    positives and negatives. Here each validation image is embedded once, from its store,
    and every fixed validation triplet is scored (`evaluation.evaluate_triplets`)."""
    embeddings = stores.embed_store(network, val_store, batch_size)
    pairs = len(val_negatives)  # anchors first, then positives
    return evaluation.evaluate_triplets(embeddings[:pairs], embeddings[pairs:], val_negatives)


def print_similarities(anchor_files, result, count=5):
    """Print the cosine similarities of the first validation anchors to their triplet's images."""
    print("Cosine similarity of validation anchors to their positive and negative:")
    similarities = (result["positive_similarities"], result["negative_similarities"])
    for name, positive, negative in zip(anchor_files[:count], *similarities, strict=False):
        print(f"  {os.path.basename(name)}: positive {positive:+.4f}, negative {negative:+.4f}")


@command_line.reports_errors("triplet_totally_looks_like.py")  # mistakes: one line, exit 2
def main(argv=None):
    """Run the example from the command line; return the process's exit code."""
    _, args = command_line.parse_triplet_command(argv, PARSER_DEFAULTS)
    if args.command:  # use a trained model: `compare`, `search`, `export` (`COMMAND --help`)
        return gallery.run_command(args, __file__, preprocess_image, decode_image)
    image_size, batch_size = (args.image_size, args.image_size), args.batch_size
    # The run folder: one run at a time, resumable; process 0 of several writes the outputs.
    folder = (args.output_dir, args.resume, args.overwrite, args.dry_run)
    place, outputs = devices.process_place(args.distribute), command_line.TRIPLET_OUTPUT_FILES
    with run_folder.Run(*folder, place, outputs, epochs=args.epochs) as run:
        args.weights = downloads.weights_choice(args.weights, "ResNet50")
        placement = devices.place_training(args.distribute, batch_size, args.seed)
        policy = devices.mixed_precision_policy(args.mixed_precision)  # default: on with a GPU
        args.mixed_precision = run.enter_context(policy)

        # Load the dataset: the folder given, generated pairs for a dry run, or the download.
        data_dir = load_dataset(args.data_dir, args.dry_run, args.seed, run.temporary_folder)

        # Prepare the data: the sorted file lists, split once; fixed validation negatives.
        (train_anchors, train_positives), validation, skipped = prepare_pairs(
            data_dir, args.limit, args.validation_split, args.seed
        )
        val_anchors, val_positives, val_negatives = validation
        args.replicas = placement.device_count
        mining.check_batch_size(batch_size, len(train_anchors), args.negatives, args.replicas)
        per_call = (args.steps_per_execution, steps_per_execution, len(train_anchors), batch_size)
        args.steps_per_execution = devices.choose_steps_per_execution(*per_call, placement)
        settings = {name: getattr(args, name) for name in command_line.TRIPLET_RUN_SETTINGS}
        resumed = command_line.TRIPLET_RESUMED_SETTINGS  # recorded, and checked on --resume
        output_dir = run.start((train_anchors, val_anchors), settings, resumed)
        if run.writes_outputs and not args.no_plots:
            triplets = training_triplets(train_anchors, train_positives, args.seed)
            batch = next(iter(make_dataset(triplets, image_size, 3)))
            visualize(*batch, output_dir / "triplets.png")

        # The embedding model and the Siamese network, trained on stored images or features.
        with placement.scope():  # the weights of every device, process and replica
            embedding = build_embedding_network(image_size, args.weights, args.normalize)
        options = (args.cache_features, run.cache_folder(), args.seed, placement.share)
        network, train_dataset, val_dataset, val_store, seconds_caching = stored_datasets(
            embedding, (train_anchors, train_positives), validation, image_size, batch_size, options
        )
        before = evaluate_embeddings(network, val_store, val_negatives, batch_size)
        with placement.scope():
            siamese_network = build_siamese_network(network)
            shares = placement.loss_shares  # mined apart: each device's share of a batch
            siamese_model = SiameseModel(siamese_network, args.margin, args.negatives, shares)
            compiling = (args.jit_compile, args.steps_per_execution)
            training = (args.epochs, args.learning_rate, compiling, run.callbacks)
            train(siamese_model, train_dataset, val_dataset, *training)
        after = evaluate_embeddings(network, val_store, val_negatives, batch_size)

        # Inspecting what the network has learned, triplet by triplet.
        if run.writes_outputs:  # process 0 of several
            print_similarities(val_anchors, after)

        # The port's extras: similarities, plots, the model, history and metrics.json, last.
        load_image = functools.partial(preprocess_image, image_size=image_size)
        results = (before, after, seconds_caching, len(train_anchors), skipped)
        extras = (validation, data_dir, results, None if args.no_plots else load_image)
        if evaluation.save_triplet_run(run, embedding, settings, *extras):
            print(f"Saved the embedding model, history, metrics and plots in {output_dir}")
            print(evaluation.summary_lines(before, after))
    return 0


if __name__ == "__main__":
    # After a failed multi-process run, exit without waiting for the lost processes.
    sys.exit(devices.leave(main()))
