"""What a newcomer tripped over: the offline hints, `--data` given a file of another kind, and
plots that did not explain themselves.

All in-process and quick (no training, no network): downloads fail through a stand-in for
`gdown`, and the figures are inspected before they are saved, through a stand-in for
`plots.save_figure`. One test starts `mnist_siamese.py` as the user would, for its one line.
"""

import gzip
import pickle
import sys
import types

import helpers
import numpy as np
import pytest

from siamese_support import command_line, downloads, mnist_data, plots

# What every message about a wrong --data file must name: what --data takes.
DATA_TAKES_HINTS = ("mnist.npz", "x_train, y_train, x_test, y_test", "*-idx?-ubyte.gz")


# ---------------------------------------------------------------------------
# Offline: one message names everything a run without a network needs
# ---------------------------------------------------------------------------


def _fake_gdown(monkeypatch, download):
    """Make `import gdown` give a module whose `download` is `download` (None: no gdown)."""
    module = None if download is None else types.SimpleNamespace(download=download)
    monkeypatch.setitem(sys.modules, "gdown", module)


def _offline(**kwargs):
    raise ConnectionError("Failed to resolve 'drive.google.com'")


@pytest.mark.parametrize(
    "download",
    [_offline, lambda **kwargs: None, None],
    ids=["download-raises", "download-returns-nothing", "gdown-missing"],
)
def test_dataset_download_failure_names_every_offline_option(tmp_path, monkeypatch, download):
    _fake_gdown(monkeypatch, download)
    ids = {"left": "id-of-left", "right": "id-of-right"}
    with pytest.raises(command_line.DownloadError) as caught:
        downloads.download_dataset(tmp_path / "cache", ids)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(("could not download left.zip", "downloading left.zip needs"))
    # Both options together: --data-dir alone only moves the failure to the weights.
    assert "--data-dir DIR --weights none" in message
    assert "left/ and right/" in message
    assert "--dry-run" in message
    # Nothing half-downloaded is left behind to be mistaken for the dataset.
    assert list((tmp_path / "cache").iterdir()) == []


def test_imagenet_weights_failure_names_weights_none_and_a_local_file():
    with pytest.raises(command_line.DownloadError) as caught:
        with downloads.weights_errors("imagenet", "ResNet50", include_top=False):
            raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None")
    message = str(caught.value)
    assert "\n" not in message
    assert "--weights none" in message and "--weights PATH" in message


# ---------------------------------------------------------------------------
# --data given a file that is not a .npz
# ---------------------------------------------------------------------------


class _Trap:
    """Unpickled, it creates the file `marker`: proof that a file's pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _png(path):
    from PIL import Image

    Image.new("L", (28, 28), 255).save(path)


def _write(kind, path, marker):
    """A file of `kind` that someone might pass as --data by mistake."""
    if kind == "png":
        _png(path)
    elif kind == "text":
        path.write_text("label,pixels\n3,0 0 0 255\n")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"x_train": _Trap(marker)}))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "gzip":
        path.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07"))
    return path


@pytest.mark.parametrize(
    "kind, name, seems",
    [
        ("png", "three.png", "a PNG image"),
        ("text", "digits.csv", "a text file"),
        ("pickle", "mnist.pkl", "a Python pickle"),
        ("empty", "mnist.npz", "an empty file"),
        ("gzip", "train-labels-idx1-ubyte.gz", "a gzip file"),
    ],
)
def test_data_of_another_kind_says_what_data_takes(tmp_path, kind, name, seems):
    marker = tmp_path / "unpickled"
    path = _write(kind, tmp_path / name, marker)
    with pytest.raises(ValueError) as caught:
        mnist_data.load_mnist(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"--data {path}: {seems}, not a .npz file; --data takes "), message
    for hint in DATA_TAKES_HINTS:
        assert hint in message, (hint, message)
    assert "allow_pickle" not in message and "pickled (object)" not in message
    assert not marker.exists()


def test_object_arrays_in_an_npz_are_refused_unread(tmp_path):
    marker = tmp_path / "unpickled"
    arrays = {"x_train": np.array([_Trap(marker)], dtype=object)}
    arrays |= {name: np.zeros(1, np.uint8) for name in ("y_train", "x_test", "y_test")}
    np.savez(tmp_path / "objects.npz", **arrays)
    with pytest.raises(ValueError, match="x_train holds Python objects") as caught:
        mnist_data.load_mnist(tmp_path / "objects.npz")
    assert "allow_pickle" not in str(caught.value)
    assert not marker.exists()


def test_a_single_array_npy_is_named_as_such(tmp_path):
    np.save(tmp_path / "digits.npy", np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="holds a single array, not named arrays"):
        mnist_data.load_mnist(tmp_path / "digits.npy")


@pytest.mark.slow
def test_data_png_or_text_from_the_command_line_is_one_line(tmp_path):
    cases = {"png": tmp_path / "three.png", "text": tmp_path / "notes.txt"}
    for kind, path in cases.items():
        _write(kind, path, tmp_path / "unpickled")
        (tmp_path / kind).mkdir()
    # Both at once: each is mostly TensorFlow's import.
    processes = {
        kind: helpers.start(helpers.MNIST, ["--data", path], tmp_path / kind)
        for kind, path in cases.items()
    }
    for kind, process in processes.items():
        result = helpers.finish(process, timeout=300)
        helpers.assert_one_line_error(
            result, "mnist_siamese.py", f"--data {cases[kind]}", "not a .npz file"
        )
        line = result.stderr.strip()
        for hint in DATA_TAKES_HINTS:
            assert hint in line, (hint, line)
        assert "allow_pickle" not in line
        assert not (tmp_path / kind / "runs").exists()


# ---------------------------------------------------------------------------
# Plots, inspected before they are saved
# ---------------------------------------------------------------------------


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plotting functions draw, kept open and rendered instead of saved."""
    figures = []

    def keep(figure, path, dpi=100):
        figure.canvas.draw()  # ticks and text positions exist only once drawn
        figures.append(figure)

    monkeypatch.setattr(plots, "save_figure", keep)
    yield figures
    for figure in figures:
        plots.pyplot().close(figure)


def _history(epochs):
    return [
        {
            "epoch": str(epoch),
            "loss": str(0.3 / (epoch + 1)),
            "val_loss": str(0.35 / (epoch + 1)),
            "accuracy": str(1 - 0.3 / (epoch + 1)),
            "val_accuracy": str(1 - 0.4 / (epoch + 1)),
        }
        for epoch in range(epochs)
    ]


def _ticks_in_view(axis):
    low, high = axis.get_xlim()
    return [tick for tick in axis.get_xticks() if low <= tick <= high]


CURVES = [plots.plot_training_curves, plots.plot_loss]


@pytest.mark.parametrize("plot", CURVES, ids=lambda plot: plot.__name__)
def test_one_epoch_is_a_marker_at_epoch_one(drawn, plot):
    plot(_history(1), "unused.png")
    (figure,) = drawn
    for axis in figure.axes:
        assert _ticks_in_view(axis) == [1.0]
        low, high = axis.get_xlim()
        # Not 0.96 to 1.04: the point sits inside an axis an epoch wide.
        assert low <= 0.6 and high >= 1.4, (low, high)
        lines = axis.get_lines()
        assert lines and all(line.get_marker() not in (None, "", "None") for line in lines)
        assert axis.get_legend() is not None


@pytest.mark.parametrize("plot", CURVES, ids=lambda plot: plot.__name__)
@pytest.mark.parametrize("epochs", [2, 12, 80])
def test_longer_runs_tick_whole_epochs(drawn, plot, epochs):
    plot(_history(epochs), "unused.png")
    (figure,) = drawn
    for axis in figure.axes:
        ticks = _ticks_in_view(axis)
        assert len(ticks) >= 2 and all(float(tick).is_integer() for tick in ticks), ticks
        low, high = axis.get_xlim()
        assert low < 1 and high > epochs
        assert axis.get_xlabel() == "epoch"


def _evaluation(rng, shift):
    return {
        "ap_distances": rng.uniform(0, 1, 10) + shift,
        "an_distances": rng.uniform(1, 3, 10) + shift,
    }


def test_triplet_distance_histograms_label_their_counts(drawn):
    rng = np.random.default_rng(0)
    plots.plot_distance_histograms(_evaluation(rng, 0), _evaluation(rng, 1), "unused.png")
    (figure,) = drawn
    assert len(figure.axes) == 2
    for axis in figure.axes:
        assert "pairs" in axis.get_ylabel()
        assert axis.get_legend() is not None
        low, high = axis.get_ylim()
        counts = [tick for tick in axis.get_yticks() if low <= tick <= high]
        assert all(float(tick).is_integer() for tick in counts), counts


def test_mnist_distance_histogram_labels_its_counts(drawn):
    rng = np.random.default_rng(1)
    labels = np.arange(40) % 2
    distances = rng.uniform(0, 1.2, 40)
    plots.plot_distance_histogram(labels, distances, 0.48, "unused.png")
    ((axis,),) = [figure.axes for figure in drawn]
    assert axis.get_ylabel() == "test pairs"
    assert axis.get_legend() is not None


def _inside(inner, outer):
    return (
        inner.x0 >= outer.x0 - 1
        and inner.x1 <= outer.x1 + 1
        and inner.y0 >= outer.y0 - 1
        and inner.y1 <= outer.y1 + 1
    )


@pytest.mark.parametrize("count", [2, 8])
def test_retrieval_legend_explains_the_green_frame(drawn, count):
    names = [f"{index}.jpg" for index in range(count)]
    distances = np.eye(count) * -1.0 + 1.0  # each query's own image is the closest
    plots.plot_retrieval_examples(
        names, names, distances, "unused.png", lambda name: np.zeros((8, 8, 3))
    )
    (figure,) = drawn
    (legend,) = figure.legends
    (label,) = [text.get_text() for text in legend.get_texts()]
    assert "own right image" in label
    (handle,) = legend.legend_handles
    framed = [
        spine.get_edgecolor()
        for axis in figure.axes
        for spine in axis.spines.values()
        if spine.get_linewidth() > 2
    ]
    assert framed and all(colour == handle.get_edgecolor() for colour in framed)
    # The key is whole, inside the image, and below every picture.
    renderer = figure.canvas.get_renderer()
    key = legend.get_window_extent(renderer)
    assert _inside(key, figure.bbox)
    assert all(key.y1 <= axis.get_window_extent(renderer).y0 for axis in figure.axes)


@pytest.mark.parametrize("count", [4, 16])
def test_pair_grid_caption_explains_red_titles(drawn, count):
    images = np.zeros((2 * count, 28, 28), np.uint8)
    pairs = np.arange(2 * count).reshape(count, 2)
    labels = np.arange(count) % 2 == 0
    distances = np.linspace(0.1, 1.0, count)
    plots.plot_pair_grid(images, pairs, labels, distances, "unused.png", count=count)
    (figure,) = drawn
    captions = {text.get_text(): text for text in figure.texts}
    red = [text for text in captions.values() if text.get_color() == "red"]
    assert red and "wrong" in red[0].get_text() and "0.5" in red[0].get_text()
    assert any("in brackets: the truth" in caption for caption in captions)
    renderer = figure.canvas.get_renderer()
    lowest_picture = min(axis.get_window_extent(renderer).y0 for axis in figure.axes)
    for text in captions.values():
        extent = text.get_window_extent(renderer)
        assert _inside(extent, figure.bbox), text.get_text()
        assert extent.y1 <= lowest_picture, text.get_text()


def test_one_epoch_runs_write_every_figure(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, (8, 28, 28), dtype=np.uint8)
    pairs = np.arange(8).reshape(4, 2)
    labels = np.array([1, 0, 1, 0], np.float32)
    distances = np.array([0.2, 0.9, 0.7, 0.3])
    embeddings, digits = rng.normal(size=(8, 4)), np.arange(8) % 10
    figures = (images, pairs, labels, distances, 0.5, embeddings, digits)
    plots.plot_mnist_run(tmp_path, _history(1), *figures)
    history = [{"epoch": "0", "loss": "0.8", "val_loss": "0.6"}]
    evaluation = _evaluation(rng, 0) | {"distance_matrix": np.eye(3) * -1.0 + 1.0}
    names = ["a.jpg", "b.jpg", "c.jpg"]
    plots.plot_triplet_run(
        tmp_path, history, evaluation, evaluation, names, names, lambda name: np.zeros((8, 8, 3))
    )
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == [
        "distance_histogram.png",
        "distances.png",
        "embedding_map.png",
        "loss.png",
        "pairs.png",
        "retrieval.png",
        "training_curves.png",
    ]
    assert all((tmp_path / name).read_bytes()[:4] == b"\x89PNG" for name in written)
