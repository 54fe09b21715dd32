"""Each script keeps its tutorial's names in its tutorial's order, so the two read side by side.

The scripts are read as text (nothing is imported): the test checks the top-level
definitions, in order, then the steps of the tutorial's flow inside `main()`, in order.
"""

import ast

import pytest
from helpers import MNIST, TRIPLET

# The classic Keras example `examples/mnist_siamese.py`: its module-level names in the order
# it defines them, then the steps of its flow (here in `main()`), as they read in the port.
MNIST_DEFINITIONS = [
    "num_classes",
    "epochs",
    "euclidean_distance",
    "eucl_dist_output_shape",
    "contrastive_loss",
    "create_pairs",
    "create_base_network",
    "compute_accuracy",
    "accuracy",
]
MNIST_FLOW = [
    "(x_train, y_train), (x_test, y_test) = ",
    "digit_indices = [np.where(y_train == i)[0] for i in range(num_classes)]",
    "tr_pairs, tr_y = create_pairs(x_train, digit_indices",
    "digit_indices = [np.where(y_test == i)[0] for i in range(num_classes)]",
    "te_pairs, te_y = create_pairs(x_test, digit_indices",
    "model, base_network = create_siamese_network(",
    "train(",
    "tr_acc = compute_accuracy(tr_y, ",
    "te_acc = compute_accuracy(te_y, ",
    'print(f"* Accuracy on training set: {100 * tr_acc:0.2f}%")',
    'print(f"* Accuracy on test set: {100 * te_acc:0.2f}%")',
]

# The keras.io example `examples/vision/siamese_network.py`, section by section: the names it
# defines at the top level, then the steps of the whole file in reading order.
TRIPLET_DEFINITIONS = [
    "target_shape",
    "cache_dir",
    "preprocess_image",
    "preprocess_triplets",
    "visualize",
    "DistanceLayer",
    "SiameseModel",
]
TRIPLET_STEPS = [
    "target_shape = (200, 200)",  # Setup
    "cache_dir = ",  # Load the dataset
    "def preprocess_image(",  # Preparing the data
    "def preprocess_triplets(",
    "anchor_images, positive_images",  # the sorted file lists (`prepare_pairs`)
    "def visualize(",
    "base_cnn = ",  # Setting up the embedding generator model
    "set_trainable_layers(base_cnn)",  # frozen up to conv5_block1_out
    "embedding = keras.Model(",
    "class DistanceLayer(",  # Setting up the Siamese Network model
    "siamese_network = keras.Model(",
    "class SiameseModel(",  # Putting everything together
    "def train_step(",
    "with tf.GradientTape() as tape:",
    "def test_step(",
    "siamese_model.compile(",  # Training (`train`, as in mnist_siamese.py)
    "siamese_model.fit(",
    "Cosine similarity",  # Inspecting what the network has learned
]
TRIPLET_FLOW = [
    "prepare_pairs(",  # the sorted file lists, split
    "siamese_network = build_siamese_network(",
    "siamese_model = SiameseModel(siamese_network",
    "train(siamese_model, ",  # Training
    "print_similarities(",  # Inspecting what the network has learned
]


def top_level_names(source):
    """The names a module defines at its top level (functions, classes, assignments), in order."""
    names = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.append((node.name, node.lineno))
        elif isinstance(node, ast.Assign):
            names += [(t.id, node.lineno) for t in node.targets if isinstance(t, ast.Name)]
    return names


def first_lines(names, wanted):
    """The line of each wanted name's first definition; fails naming a missing one."""
    lines = {}
    for name, line in names:
        lines.setdefault(name, line)
    missing = [name for name in wanted if name not in lines]
    assert not missing, f"not defined at the top level: {missing}"
    return [lines[name] for name in wanted]


def assert_in_order(wanted, lines):
    """The lines increase with the list of names; otherwise say which pair is out of order."""
    for (before, first), (after, second) in zip(
        zip(wanted, lines, strict=True), zip(wanted[1:], lines[1:], strict=True), strict=False
    ):
        assert first < second, f"{before} (line {first}) must come before {after} (line {second})"


def function_source(source, name):
    """The source text of the top-level function `name`."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(source, node)
    raise AssertionError(f"no function {name}")


def flow_positions(text, steps):
    """Where each step of the flow first appears in `text`, searching on from the last."""
    positions, start = [], 0
    for step in steps:
        position = text.find(step, start)
        assert position >= 0, f"step {step!r} missing or out of order"
        positions.append(position)
        start = position + len(step)
    return positions


def test_mnist_definitions_follow_the_example():
    source = MNIST.read_text()
    lines = first_lines(top_level_names(source), MNIST_DEFINITIONS)
    assert_in_order(MNIST_DEFINITIONS, lines)
    # The tutorial's first definitions come early: a reader scrolls no set-up to reach them.
    assert lines[0] <= 60 and lines[MNIST_DEFINITIONS.index("euclidean_distance")] <= 70, lines


def test_mnist_main_runs_the_example_flow_in_order():
    source = MNIST.read_text()
    flow_positions(function_source(source, "main"), MNIST_FLOW)


def test_triplet_definitions_follow_the_example():
    source = TRIPLET.read_text()
    lines = first_lines(top_level_names(source), TRIPLET_DEFINITIONS)
    assert_in_order(TRIPLET_DEFINITIONS, lines)
    assert lines[0] <= 60, lines
    flow_positions(source, TRIPLET_STEPS)


def test_triplet_main_runs_the_example_flow_in_order():
    source = TRIPLET.read_text()
    flow_positions(function_source(source, "main"), TRIPLET_FLOW)


def test_the_checks_fail_on_a_swapped_order():
    # The order checks themselves: two names or two steps swapped must be reported.
    with pytest.raises(AssertionError, match="must come before"):
        assert_in_order(["b", "a"], [20, 10])
    with pytest.raises(AssertionError, match="out of order"):
        flow_positions("second first", ["first", "second"])
