"""Test-suite guards: no test may leave process-wide settings changed for the tests after it.

A few tests call a script's `main()` inside the pytest process. `main()` sets what a script
may set for its own process (random seeds, TensorFlow's thread count, Keras's dtype policy,
signal handlers); in a test process, later tests would inherit it and their results would
depend on the order the tests ran in. The autouse fixture below compares those settings
before and after every test and fails the test that changed one. Random seeds are the
exception: `main()` seeds them on purpose, so the fixture restores them after each test.

`pytest --shuffle SEED` runs the modules, and the tests within each module, in an order
drawn from SEED (modules stay together, so module-scoped fixtures are built once), to find
tests that depend on their order.
"""

import os
import random
import signal
import sys

import numpy as np
import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--shuffle",
        type=int,
        metavar="SEED",
        help="run test modules, and the tests within each, in a random order drawn from SEED",
    )


# The longest test files, longest first (summed test times in CI's two lanes): they run
# before the others. pytest-xdist hands out whole files in the order collected (with
# --no-loadscope-reorder, as .ci/run's first lane runs it); a long file handed out last
# would run alone while the other workers wait.
LONGEST_FIRST = [
    "test_triplet_performance",
    "test_reliability",
    "test_triplet_jax",
    "test_resume_draws",
    "test_triplet_multi_process",
    "test_triplet_mining",
    "test_triplet_cli",
    "test_first_seconds_and_edges",
    "test_mnist_backends",
    "test_triplet_search",
    "test_mnist_multi_process",
    "test_mnist_cli",
    "test_triplet_backends",
    "test_export",
    "test_fast_epochs",
    "test_mnist_compare",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # a stable sort
    seed = config.getoption("--shuffle")
    if seed is None:
        return
    rng = random.Random(seed)
    modules = {}
    for item in items:
        modules.setdefault(item.module.__name__, []).append(item)
    groups = list(modules.values())
    rng.shuffle(groups)
    for group in groups:
        rng.shuffle(group)
    items[:] = [item for group in groups for item in group]


def pytest_report_header(config):
    seed = config.getoption("--shuffle")
    return None if seed is None else f"test order shuffled with seed {seed}"


def process_settings():
    """What a test could change for the whole process, as comparable values."""
    settings = {
        "working folder": os.getcwd(),
        # pytest itself sets PYTEST_CURRENT_TEST for each test and phase.
        "environment": {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},
        "SIGINT handler": signal.getsignal(signal.SIGINT),
        "SIGTERM handler": signal.getsignal(signal.SIGTERM),
    }
    if "tensorflow" in sys.modules:
        threading = sys.modules["tensorflow"].config.threading
        settings["TensorFlow intra-op threads"] = threading.get_intra_op_parallelism_threads()
        settings["TensorFlow inter-op threads"] = threading.get_inter_op_parallelism_threads()
    if "keras" in sys.modules:
        keras = sys.modules["keras"]
        settings["Keras dtype policy"] = keras.config.dtype_policy().name
        settings["Keras floatx"] = keras.config.floatx()
        settings["Keras image data format"] = keras.config.image_data_format()
    return settings


def random_state():
    """Every global random state `keras.utils.set_random_seed` sets."""
    state = {"python": random.getstate(), "numpy": np.random.get_state()}
    if "tensorflow" in sys.modules:
        from tensorflow.python.framework import random_seed

        state["tensorflow"] = random_seed.get_seed(None)[0]
    if "keras" in sys.modules:
        from keras.src.backend.common import global_state

        state["keras"] = {
            name: global_state.get_global_attribute(name)
            for name in ("global_random_seed", "global_seed_generator")
        }
    return state


def restore_random_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "tensorflow" in state:
        sys.modules["tensorflow"].random.set_seed(state["tensorflow"])
    if "keras" in state:
        from keras.src.backend.common import global_state

        for name, value in state["keras"].items():
            global_state.set_global_attribute(name, value)


@pytest.fixture(autouse=True)
def process_settings_unchanged():
    """Fail a test that leaves a process-wide setting changed; restore the random seeds."""
    before = process_settings()
    randomness = random_state()
    yield
    restore_random_state(randomness)
    after = process_settings()
    changed = []
    for name in before.keys() & after.keys():
        if name == "environment":
            keys = sorted(set(before[name]) ^ set(after[name]))
            keys += [
                k
                for k in before[name].keys() & after[name].keys()
                if before[name][k] != after[name][k]
            ]
            changed += [f"environment variable {key}" for key in keys]
        elif before[name] != after[name]:
            changed.append(f"{name}: {before[name]!r} -> {after[name]!r}")
    if changed:
        pytest.fail(
            "the test left process-wide settings changed, which later tests would inherit: "
            + "; ".join(changed),
            pytrace=False,
        )


@pytest.fixture()
def mixed_precision():
    """Run the test under Keras's mixed_float16 policy; the previous policy comes back after."""
    from siamese_support import devices

    with devices.mixed_precision_policy(True):
        yield


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt in a test that asks for it, whatever the runner inherited.

    A suite started as a background job runs with SIGINT ignored; the fixture installs
    Python's default handler and puts the previous one back afterwards.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
