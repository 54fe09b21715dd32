"""What the two tutorial scripts need but the tutorials do not teach.

`mnist_siamese.py` and `triplet_totally_looks_like.py` hold the tutorials' own code, in the
tutorials' order; this package holds the rest, so that each script reads beside its
tutorial. The scripts import it; it never imports a script. Modules:

- `command_line`: both scripts' options, and mistakes reported in one line with exit code 2.
- `devices`: TensorFlow's quiet start, the device line, `tf.distribute` strategies, threads.
- `run_folder`: the output folder, atomic writes, the per-epoch backup and resuming.
- `evaluation`: accuracy at the best threshold, ROC AUC, recall@k, similarities (NumPy).
- `plots`: the PNG figures each run writes.
- `mnist_data`: MNIST from Keras's download, a `mnist.npz` file or the IDX files, checked.
- `downloads`: the Totally Looks Like download and a zip extraction that cannot escape.
- `image_folders`: the `left/` and `right/` folders of an image-pair dataset, checked.
- `stores`: decoded images and frozen-trunk features, computed once per run.
- `synthetic`: generated image pairs for offline runs and tests.

Only `devices`, `stores`, `image_folders` and `synthetic` use TensorFlow, and they import it
only when a function needs it or when they are imported themselves (`stores`), so that the
command line answers before TensorFlow's import.
"""
