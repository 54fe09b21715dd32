"""`--normalize`: unit-length triplet embeddings, with FaceNet's margin unless one is given."""

import numpy as np
import pytest

import triplet_totally_looks_like as tll
from siamese_support import command_line


def parse(*argv):
    """The training command line's arguments, as the script reads them."""
    _, args = command_line.parse_triplet_command(list(argv), tll.PARSER_DEFAULTS)
    return args


def test_the_margin_is_the_examples_unless_the_embeddings_are_normalized():
    assert parse().margin == tll.margin == 0.5
    assert parse().normalize is False
    normalized = parse("--normalize")
    assert normalized.normalize is True
    assert normalized.margin == command_line.NORMALIZED_MARGIN == 0.2
    assert parse("--normalize", "--margin", "1.5").margin == 1.5
    assert parse("--margin", "0.3").margin == 0.3


def test_a_resumed_run_keeps_its_normalization():
    assert "normalize" in command_line.TRIPLET_RESUMED_SETTINGS


@pytest.mark.parametrize("normalize", [False, True])
def test_normalized_embeddings_have_unit_length(normalize):
    embedding = tll.build_embedding_network((32, 32), weights=None, normalize=normalize)
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    lengths = np.linalg.norm(np.asarray(embedding(images, training=False)), axis=1)
    if normalize:
        assert lengths == pytest.approx(np.ones(4), abs=1e-5)
        assert embedding.layers[-1].__class__.__name__ == "UnitNormalization"
    else:
        assert np.all(np.abs(lengths - 1.0) > 1e-2)  # the example's: no particular length
