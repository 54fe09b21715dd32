"""A resumed run's random draws: those of the run it resumes, as if it had not stopped.

Keras's `BackupAndRestore` restores the weights, the optimizer (its step count too) and the
epoch to start from; it does not know the draws. Two kinds go on from epoch to epoch:

- the datasets' orders and negatives, drawn from the seed and a pass's number
  (`pipelines.tell_epoch` numbers the passes from the epoch `fit` begins);
- the layers' seed generators (the MNIST network's Dropout masks), whose states count the
  draws made so far: the weights file leaves them out, so a resumed run would draw its
  first epoch's masks again. The backup keeps them in its folder (`save_seed_states`).
"""

import json
import os
import pathlib

import keras
import numpy as np

from siamese_support import pipelines

# The states of the layers' seed generators at the start of an epoch, in the backup folder.
SEED_STATES_FILE = "seed_generators.json"


def seed_generator_states(model):
    """The state variables of every seed generator of `model`'s layers, in a fixed order."""
    return [variable for variable in model.variables if variable.name == "seed_generator_state"]


def save_seed_states(model, backup_dir, epoch):
    """Write the seed generators' states after epoch `epoch` in `backup_dir`, for a resume.

    Called by the backup as it saves that epoch, before it writes its own files: the states
    of the epoch before are kept too, for a backup that falls back to that epoch's weights.
    The file is written whole, then renamed, so a run stopped meanwhile keeps the last one.
    """
    variables = seed_generator_states(model)
    if not variables:  # nothing to keep (the triplet network)
        return
    path = pathlib.Path(backup_dir) / SEED_STATES_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    kept = {key: states for key, states in saved.items() if key == str(epoch)}
    kept[str(epoch + 1)] = [np.asarray(variable).tolist() for variable in variables]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(kept))
    os.replace(partial, path)


class ResumedDraws(keras.callbacks.Callback):
    """Gives every epoch the draws an uninterrupted run gives it, resumed or not.

    At each epoch's start, tells the datasets the epoch (`pipelines.tell_epoch`). When `fit`
    starts at a later epoch than 0 (a resumed run), first sets the seed generators back to
    their states at that epoch's start, as `save_seed_states` kept them in `backup_dir`.
    """

    def __init__(self, backup_dir):
        super().__init__()
        self.path = pathlib.Path(backup_dir) / SEED_STATES_FILE
        self.first_epoch = True

    def on_train_begin(self, logs=None):
        self.first_epoch = True

    def on_epoch_begin(self, epoch, logs=None):
        if self.first_epoch and epoch > 0 and self.path.exists():
            saved = json.loads(self.path.read_text()).get(str(epoch))
            variables = seed_generator_states(self.model)
            if saved is not None and len(saved) == len(variables):
                for variable, state in zip(variables, saved, strict=True):
                    variable.assign(np.asarray(state, dtype=variable.dtype))
        self.first_epoch = False
        # Whether `fit` read a first batch before the first epoch, as Keras's TensorFlow
        # trainer does under a `tf.distribute` strategy (see `pipelines.tell_epoch`).
        strategy = getattr(self.model, "_distribute_strategy", None) is not None
        pipelines.tell_epoch(epoch, strategy)
