"""The PNG figures a run writes: training curves, distance histograms, example pairs.

The tutorials show a few images inline; a script run from the shell writes its figures to
the run folder instead. Matplotlib is imported only when a figure is drawn.
"""

import numpy as np

from siamese_support import run_folder


def pyplot():
    """Matplotlib's pyplot on a file-only backend, imported only when plotting."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def save_figure(figure, path, dpi=100):
    """Save a figure as PNG through a temporary file, then close it."""
    try:
        with run_folder.atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=dpi)
    finally:
        pyplot().close(figure)


def whole_numbers(axis):
    """Ticks only at whole numbers on `axis` (an x or y axis): epochs, counts.

    `min_n_ticks=1` because MaxNLocator drops `integer` when fewer whole numbers than that
    are in view, as for a single epoch; steps of 1, 2, 5 or 10 give round numbers (it picks
    steps of 8 for 60 epochs otherwise).
    """
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1, steps=[1, 2, 5, 10]))


def epoch_axis(axis, epoch_numbers):
    """Label the x axis of `axis` in whole epochs, with room around a single epoch.

    Left alone, Matplotlib pads a lone point by 4 % either side and ticks 0.96 to 1.04,
    fractions of an epoch that no run has; half an epoch either side keeps one tick.
    """
    whole_numbers(axis.xaxis)
    axis.set_xlabel("epoch")
    if len(set(epoch_numbers)) == 1:
        axis.set_xlim(epoch_numbers[0] - 0.5, epoch_numbers[0] + 0.5)


def line_style(epoch_count):
    """Markers for a curve of `epoch_count` points: a single epoch is a marker, not a line.

    Smaller markers past a few dozen epochs, where full-size ones would hide the line.
    """
    return {"marker": "o", "markersize": 6 if epoch_count <= 30 else 3}


def plot_training_curves(history_rows, path):
    """Loss and accuracy per epoch, training vs test pairs."""
    epoch_numbers = [int(row["epoch"]) + 1 for row in history_rows]
    figure, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    for axis, name in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix, label in (("", "training pairs"), ("val_", "test pairs")):
            values = [float(row[prefix + name]) for row in history_rows]
            axis.plot(epoch_numbers, values, label=label, **line_style(len(epoch_numbers)))
        epoch_axis(axis, epoch_numbers)
        axis.set_title(name)
        axis.legend()
    figure.tight_layout()
    save_figure(figure, path)


def plot_distance_histogram(labels, distances, threshold, path, example_threshold=0.5):
    """Histogram of test-pair distances, same vs different digits, with thresholds."""
    labels = np.asarray(labels).astype(bool)
    figure, axis = pyplot().subplots(figsize=(7, 4))
    bins = np.linspace(0, max(float(np.max(distances)), 1.0), 60)
    axis.hist(distances[labels], bins=bins, alpha=0.6, label="same digit")
    axis.hist(distances[~labels], bins=bins, alpha=0.6, label="different digits")
    axis.axvline(example_threshold, color="black", label=f"threshold {example_threshold}")
    axis.axvline(threshold, color="red", linestyle="--", label=f"best threshold {threshold:.3f}")
    axis.set_xlabel("predicted distance")
    axis.set_ylabel("test pairs")
    whole_numbers(axis.yaxis)
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path)


def plot_pair_grid(images, pairs, labels, distances, path, count=16, threshold=0.5):
    """A grid of test pairs spread over all digits, titled with distance and truth.

    A pair that `threshold` (the example's 0.5) gets wrong has a red title; a caption
    under the grid says so.
    """
    shown = np.unique(np.linspace(0, len(pairs) - 1, min(count, len(pairs))).astype(int))
    # Pairs alternate positive, negative: nudge every other pick so both kinds show.
    shown = np.unique(np.clip(shown - (shown % 2) + np.arange(len(shown)) % 2, 0, len(pairs) - 1))
    columns = 4
    rows = -(-len(shown) // columns)
    figure, axes = pyplot().subplots(
        rows, columns, figsize=(2.6 * columns, 1.6 * rows), squeeze=False
    )
    for axis in axes.ravel():
        axis.axis("off")
    for axis, index in zip(axes.ravel(), shown, strict=False):
        first, second = pairs[index]
        axis.imshow(np.hstack([images[first], images[second]]), cmap="gray")
        truth = "same" if labels[index] else "different"
        wrong = (distances[index] < threshold) != bool(labels[index])
        # Text placed above the image rather than set_title, and fixed margins rather than
        # tight_layout: both measure every hidden axis, which took 0.3 s of 0.5 s here.
        axis.text(
            0.5,
            1.04,
            f"d={distances[index]:.2f} ({truth})",
            transform=axis.transAxes,
            horizontalalignment="center",
            fontsize=9,
            color="red" if wrong else "black",
        )
    # Without a key, a reader cannot tell that red means wrong, nor what the brackets hold.
    figure_height = figure.get_figheight()
    captions = (
        (
            "d: distance between the two embeddings (read as the same digit when "
            f"d < {threshold:g}); in brackets: the truth",
            "black",
        ),
        (f"red: the threshold {threshold:g} gets the pair wrong", "red"),
    )
    for line, (caption, colour) in enumerate(captions):
        figure.text(
            0.5,
            (0.32 - 0.2 * line) / figure_height,
            caption,
            horizontalalignment="center",
            fontsize=9,
            color=colour,
        )
    # 0.3 inch above the first row holds its titles, 0.55 inch below the last the captions.
    figure.subplots_adjust(
        left=0.02, right=0.98, bottom=0.55 / figure_height, top=1 - 0.3 / figure_height
    )
    save_figure(figure, path)


def plot_loss(history_rows, path):
    """Training and validation loss per epoch."""
    figure, axis = pyplot().subplots(figsize=(6, 4))
    epoch_numbers = [int(row["epoch"]) + 1 for row in history_rows]
    for key, label in (("loss", "training"), ("val_loss", "validation")):
        values = [float(row[key]) for row in history_rows if row.get(key) not in (None, "")]
        if len(values) == len(epoch_numbers):
            axis.plot(epoch_numbers, values, label=label, **line_style(len(epoch_numbers)))
    epoch_axis(axis, epoch_numbers)
    axis.set_ylabel("triplet loss")
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path, dpi=90)


def plot_distance_histograms(before, after, path):
    """Validation anchor-positive vs anchor-negative distances, before and after training."""
    figure, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for axis, evaluation, title in ((axes[0], before, "before"), (axes[1], after, "after")):
        distances = np.concatenate([evaluation["ap_distances"], evaluation["an_distances"]])
        bins = np.linspace(distances.min(), distances.max() + 1e-9, 30)
        axis.hist(evaluation["ap_distances"], bins=bins, alpha=0.6, label="anchor-positive")
        axis.hist(evaluation["an_distances"], bins=bins, alpha=0.6, label="anchor-negative")
        axis.set_title(f"{title} training")
        axis.set_xlabel("squared L2 distance")
        axis.set_ylabel("validation pairs")
        whole_numbers(axis.yaxis)
        axis.legend()
    figure.tight_layout()
    save_figure(figure, path, dpi=90)


def plot_retrieval_examples(
    anchor_images, positive_images, distance_matrix, path, load_image, queries=4, top=5
):
    """For a few validation queries (left image): the 5 closest right images.

    `load_image(filename)` gives an image as 0-255 values. The right answer, where it
    appears, has a green frame, which a legend under the grid explains.
    """
    from matplotlib.patches import Patch

    queries = min(queries, len(anchor_images))
    top = min(top, len(positive_images))
    figure, axes = pyplot().subplots(queries, top + 1, figsize=(2 * (top + 1), 2 * queries))
    axes = np.asarray(axes).reshape(queries, top + 1)
    for row in range(queries):
        ranked = np.argsort(distance_matrix[row], kind="stable")[:top]
        pictures = [anchor_images[row]] + [positive_images[index] for index in ranked]
        for column, filename in enumerate(pictures):
            axis = axes[row, column]
            image = np.asarray(load_image(filename)) / 255.0
            axis.imshow(np.clip(image, 0.0, 1.0))
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_title("query")
            else:
                axis.set_title(f"#{column}")
                if ranked[column - 1] == row:
                    for spine in axis.spines.values():
                        spine.set_edgecolor("green")
                        spine.set_linewidth(4)
    # A frame alone does not say what it marks, nor what a row without one means.
    partner = Patch(facecolor="white", edgecolor="green", linewidth=3)
    # Two short lines, so that the key fits the narrowest grid (a query and one image).
    key = f"the query's own right image, if among\nthe {top} closest (#1 is the closest)"
    figure.legend([partner], [key], loc="lower center", frameon=False, fontsize=9)
    figure.tight_layout(rect=(0, 0.45 / figure.get_figheight(), 1, 1))
    save_figure(figure, path, dpi=90)


def principal_plane(embeddings):
    """`embeddings` (one row each) projected on their two directions of largest variance.

    Principal component analysis in NumPy, from the covariance matrix (its size is the
    embedding's, 128 for MNIST), so it costs milliseconds. A linear projection keeps what
    the distances mean: what is far apart on the map is far apart in the embedding. Returns
    the 2-D points and the fraction of the variance they keep.
    """
    centred = np.asarray(embeddings, np.float64)
    centred = centred - centred.mean(axis=0)
    variances, directions = np.linalg.eigh(centred.T @ centred)  # ascending order
    kept = variances[::-1][:2].sum() / max(variances.sum(), 1e-300)
    return centred @ directions[:, ::-1][:, :2], float(kept)


def plot_embedding_map(embeddings, digits, path):
    """The test embeddings on their principal plane, one colour per digit, with a legend.

    Hadsell, Chopra and LeCun (2006) show what their network learned as such a map. Points
    are small and half transparent, so that dense clusters show as dense.
    """
    points, kept = principal_plane(embeddings)
    digits = np.asarray(digits).ravel()
    figure, axis = pyplot().subplots(figsize=(7.5, 6.5))
    colours = pyplot().get_cmap("tab10")
    for digit in range(10):
        chosen = digits == digit
        axis.scatter(*points[chosen].T, s=3, alpha=0.5, color=colours(digit), label=str(digit))
    legend = axis.legend(title="digit", loc="center left", bbox_to_anchor=(1.0, 0.5))
    for handle in legend.legend_handles:  # the key's dots larger and opaque, to be read
        handle.set_sizes([30])
        handle.set_alpha(1.0)
    axis.set_xlabel("first principal component")
    axis.set_ylabel("second principal component")
    axis.set_title(
        f"Test embeddings of {len(digits):,} digits, projected to two dimensions "
        f"(they keep {kept:.0%} of the variance)",
        fontsize=10,
    )
    figure.subplots_adjust(left=0.1, right=0.86, bottom=0.09, top=0.93)
    save_figure(figure, path)


def plot_mnist_run(
    output_dir, history_rows, images, pairs, labels, distances, threshold, embeddings, digits
):
    """The four figures of a `mnist_siamese.py` run, written into `output_dir`.

    `embeddings` and `digits` are the embeddings of `images` (the test digits) and their
    labels, for the embedding map.
    """
    plot_training_curves(history_rows, output_dir / "training_curves.png")
    plot_distance_histogram(labels, distances, threshold, output_dir / "distance_histogram.png")
    plot_pair_grid(images, pairs, labels, distances, output_dir / "pairs.png")
    plot_embedding_map(embeddings, digits, output_dir / "embedding_map.png")


def plot_triplet_run(
    output_dir, history_rows, before, after, anchor_images, positive_images, load_image
):
    """The loss, distance and retrieval figures of a `triplet_totally_looks_like.py` run.

    `before` and `after` are the validation evaluations (`evaluation.evaluate_triplets`),
    `anchor_images` and `positive_images` the validation files, `load_image` their loader.
    """
    plot_loss(history_rows, output_dir / "loss.png")
    plot_distance_histograms(before, after, output_dir / "distances.png")
    plot_retrieval_examples(
        anchor_images,
        positive_images,
        after["distance_matrix"],
        output_dir / "retrieval.png",
        load_image,
    )


def plot_search_results(query, query_title, images, titles, path, tile=160):
    """The query image and the images found for it, in a row with their titles, as a PNG.

    Images are 0-255 float arrays, as the triplet script's loader returns them. Drawn with
    Pillow rather than Matplotlib, whose import alone takes most of a second: a search from
    the cache then costs little beyond loading the model.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    caption, gap = 30, 8
    count = len(images) + 1
    canvas = Image.new("RGB", (gap + count * (tile + gap), caption + tile + 2 * gap), "white")
    draw = ImageDraw.Draw(canvas)
    pictures = zip([query, *images], [query_title, *titles], strict=True)
    for index, (image, title) in enumerate(pictures):
        pixels = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
        left = gap + index * (tile + gap)
        canvas.paste(Image.fromarray(pixels).resize((tile, tile)), (left, gap + caption))
        draw.multiline_text((left, gap // 2), title, fill="black", font=font)
    with run_folder.atomic_path(path) as temporary:
        canvas.save(temporary, format="PNG")
