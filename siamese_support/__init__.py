"""What the two tutorial scripts need but the tutorials do not teach.

`mnist_siamese.py` and `triplet_totally_looks_like.py` hold the tutorials' own code, in the
tutorials' order; this package holds the rest, so that each script reads beside its
tutorial. The scripts import it; it never imports a script. Modules:

- `command_line`: both scripts' options, and mistakes reported in one line with exit code 2.
- `devices`: TensorFlow's quiet start, the device line, `tf.distribute` strategies, threads,
  mixed precision.
- `pipelines`: `tf.data` helpers (per-epoch shuffled index batches, autotuning off), and the
  NumPy batches (`PairBatches`, `TripletBatches`) that replace them under JAX and PyTorch.
- `progress`: long work shows Keras's bar on a terminal, a line every 5 % in a log; `fit()`'s
  verbosity to match. Imports nothing heavy (Keras only inside its functions).
- `run_folder`: the output folder (one run at a time), atomic writes, the per-epoch backup,
  resuming, and failures (Ctrl-C, SIGTERM, a full disk) explained in one line.
- `resumed_draws`: a resumed run's random draws (each epoch's orders and negatives, the
  Dropout masks' seed state) as an uninterrupted run's.
- `evaluation`: accuracy at the best threshold, ROC AUC, recall@k, similarities (NumPy).
- `plots`: the PNG figures each run writes.
- `mnist_data`: MNIST from Keras's download, a `mnist.npz` file or the IDX files, checked.
- `downloads`: the Totally Looks Like download, a zip extraction that cannot escape, and
  the ResNet50 weights choice with its errors in one line.
- `image_folders`: the `left/` and `right/` folders of an image-pair dataset, checked.
- `pillow_images`: image files read with Pillow and NumPy as TensorFlow reads them (JAX, PyTorch).
- `stores`: decoded images and frozen-trunk features, computed once per run.
- `synthetic`: generated image pairs for offline runs and tests.
- `real_pairs`: real-image pairs (MNIST digits) in the Totally Looks Like layout, for offline
  checks on real images.
- `mining`: semi-hard and hard negatives chosen within a batch, for the triplet training step.
- `trained_model`: a finished run's model found and loaded, digit images read the way MNIST
  training read them, and `mnist_siamese.py compare`.
- `gallery`: `triplet_totally_looks_like.py search` and `compare`, and the cache of a
  gallery folder's embeddings.

`command_line` imports nothing heavy, so that the command line answers before TensorFlow's
import. `devices`, `pipelines`, `stores`, `image_folders` and `gallery` import TensorFlow only
inside the functions of its path, so that both scripts run where it is not installed;
`mining`, `stores`, `resumed_draws` and `gallery` import Keras; `pillow_images`,
`synthetic`, `real_pairs` and `trained_model` import Pillow (and `trained_model` Keras)
inside the functions that need them.
"""
