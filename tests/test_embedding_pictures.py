"""What the runs draw of their embeddings: MNIST's map, the triplet run's projector files."""

import numpy as np
import pytest

from siamese_support import plots, projector


def test_the_principal_plane_is_the_plane_of_largest_variance():
    rng = np.random.default_rng(0)
    # Spread 10 along axis 2, 3 along axis 0, 0.1 along the others: the plane is (2, 0).
    embeddings = rng.normal(size=(500, 6)) * np.array([3.0, 0.1, 10.0, 0.1, 0.1, 0.1])
    points, kept = plots.principal_plane(embeddings + 5.0)
    centred = embeddings - embeddings.mean(axis=0)
    assert np.abs(np.corrcoef(points[:, 0], centred[:, 2])[0, 1]) > 0.999
    assert np.abs(np.corrcoef(points[:, 1], centred[:, 0])[0, 1]) > 0.999
    assert 0.99 < kept < 1.0
    assert points.mean(axis=0) == pytest.approx([0.0, 0.0], abs=1e-9)


def test_the_embedding_map_has_a_legend_of_the_ten_digits(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    digits = np.repeat(np.arange(10), 20)
    embeddings = rng.normal(size=(200, 16)) + digits[:, None] * 3.0
    saved = {}
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: saved.update(figure=figure))
    plots.plot_embedding_map(embeddings, digits, tmp_path / "embedding_map.png")
    (axis,) = saved["figure"].axes
    legend = axis.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == [str(d) for d in range(10)]
    assert legend.get_title().get_text() == "digit"
    # One scatter per digit, each holding that digit's 20 points.
    assert [len(collection.get_offsets()) for collection in axis.collections] == [20] * 10
    assert "200 digits" in axis.get_title()


def test_the_projector_files_are_what_tensorboard_reads(tmp_path):
    text_format = pytest.importorskip("google.protobuf.text_format")
    config_module = pytest.importorskip("tensorboard.plugins.projector.projector_config_pb2")
    rng = np.random.default_rng(2)
    anchors = [f"/data/left/{index:05d}.jpg" for index in range(3)]
    positives = [f"/data/right/{index:05d}.jpg" for index in range(3)]
    embeddings = rng.normal(size=(6, 4)).astype(np.float32)
    loaded = []

    def load_image(name):
        loaded.append(name)
        return np.full((20, 30, 3), 10.0 * len(loaded))

    folder = tmp_path / "logs" / "validation"
    projector.write_projector_files(folder, embeddings, anchors, positives, load_image)
    assert loaded == anchors + positives
    config = text_format.Parse(
        (folder / "projector_config.pbtxt").read_text(), config_module.ProjectorConfig()
    )
    (embedding,) = config.embeddings
    assert embedding.tensor_path == "embeddings.tsv"
    assert list(embedding.sprite.single_image_dim) == [64, 64]
    assert np.loadtxt(folder / "embeddings.tsv", delimiter="\t") == pytest.approx(embeddings)
    rows = (folder / "metadata.tsv").read_text().splitlines()
    assert rows[0] == "image\tside\tpair"
    assert rows[1:] == [
        "00000.jpg\tleft\t0",
        "00001.jpg\tleft\t1",
        "00002.jpg\tleft\t2",
        "00000.jpg\tright\t0",
        "00001.jpg\tright\t1",
        "00002.jpg\tright\t2",
    ]
    from PIL import Image

    with Image.open(folder / "sprite.png") as sheet:
        assert sheet.size == (3 * 64, 3 * 64)  # a 3 x 3 grid for 6 images
        assert sheet.getpixel((64 + 5, 5)) == (20, 20, 20)  # the second image, row 0
        assert sheet.getpixel((5, 64 + 5)) == (40, 40, 40)  # the fourth, row 1
    assert not list(folder.glob(".tmp-*"))


def test_without_a_loader_the_projector_has_no_sprite(tmp_path):
    projector.write_projector_files(tmp_path, np.zeros((2, 3)), ["a.png"], ["b.png"])
    assert not (tmp_path / "sprite.png").exists()
    assert "sprite" not in (tmp_path / "projector_config.pbtxt").read_text()
    with pytest.raises(ValueError, match="3 embeddings for 2 images"):
        projector.write_projector_files(tmp_path, np.zeros((3, 3)), ["a.png"], ["b.png"])


def test_thumbnails_shrink_so_that_the_sprite_fits_tensorboard():
    assert projector.thumbnail_size(6) == 64
    assert projector.thumbnail_size(10_000) == 64  # 100 columns of 64 pixels
    assert projector.thumbnail_size(20_000) == 57  # 142 columns of 57 pixels: 8,094
    assert projector.thumbnail_size(20_000) * 142 <= projector.LARGEST_SPRITE


def test_a_new_run_removes_the_old_projector_files_with_the_logs(tmp_path):
    from siamese_support import run_folder

    validation = tmp_path / "logs" / "validation"
    projector.write_projector_files(validation, np.zeros((2, 3)), ["a.png"], ["b.png"])
    (validation / "events.out.tfevents.1.host").write_bytes(b"")
    (tmp_path / "logs" / "train").mkdir()
    run_folder.remove_tensorboard_logs(tmp_path)
    assert not (tmp_path / "logs").exists()
    # What the run did not write stays, and so do the folders that hold it.
    projector.write_projector_files(validation, np.zeros((2, 3)), ["a.png"], ["b.png"])
    (validation / "notes.txt").write_text("mine")
    run_folder.remove_tensorboard_logs(tmp_path)
    assert [path.name for path in validation.iterdir()] == ["notes.txt"]
