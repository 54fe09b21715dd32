"""mnist_siamese.py under tf.distribute.MirroredStrategy, on two logical CPU devices.

The CPU is split into two logical devices before TensorFlow starts, in a subprocess, so the
strategy really splits each batch across two replicas. One short epoch must give a loss
close to the single-device run of the same command.
"""

import csv
import textwrap

import helpers
import pytest
from helpers import FIXTURE, MNIST

# The script's main(), in a process whose CPU is split into two logical devices when the
# first argument after the script's path says "mirrored".
RUNNER = textwrap.dedent(
    """
    import sys
    import tensorflow as tf

    if sys.argv[2] == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    import mnist_siamese

    sys.exit(mnist_siamese.main(sys.argv[3:]))
    """
)


def run_one_epoch(strategy, output_dir):
    """Train one epoch on 1,500 fixture images with --distribute `strategy`."""
    arguments = ["--data", FIXTURE, "--limit", "1500", "--epochs", "1", "--no-plots"]
    arguments += ["--output-dir", output_dir, "--distribute", strategy]
    result = helpers.run(MNIST, [strategy, *arguments], output_dir.parent, RUNNER)
    assert result.returncode == 0, helpers.describe(result)
    with open(output_dir / "history.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    return result.stdout, rows


@pytest.mark.slow
def test_mirrored_strategy_matches_single_device(tmp_path):
    single_output, single_rows = run_one_epoch("none", tmp_path / "single")
    mirrored_output, mirrored_rows = run_one_epoch("mirrored", tmp_path / "mirrored")

    assert single_output.splitlines()[0] == "Backend: tensorflow. Device: CPU"
    assert "MirroredStrategy over 2 replicas" in mirrored_output.splitlines()[0]
    assert len(single_rows) == len(mirrored_rows) == 1
    for key in ("loss", "val_loss"):
        single, mirrored = float(single_rows[0][key]), float(mirrored_rows[0][key])
        # The loss must be averaged over the global batch, not summed over replicas: a
        # summed loss would come out about twice as large.
        assert abs(mirrored - single) / single < 0.15, (key, single, mirrored)
