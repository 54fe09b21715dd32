#!/usr/bin/env bash
# The GPU check: on a machine with a GPU and JAX but without TensorFlow or Keras, print
#   1. mnist_siamese.py's seconds per epoch under JAX (the 5,000 digits of data/mnist-tiny.npz,
#      8,660 training pairs, batch 128, 3 epochs; the first epoch includes the compilation),
#   2. the triplet model's seconds per training step under JAX at 200 x 200, batch 32, weights
#      none, with the frozen trunk's features cached (the script's default) and without, each
#      under the script's default precision (mixed float16 on a GPU) and in float32, and
#   3. the plain Keras ResNet50 step on the same work (benchmarks/plain_resnet_step.py), in
#      float32: compare it with the triplet step's float32 line.
# It installs nothing from a network: WHEELS is a folder of the wheels that machine lacks
# (Keras and what it needs: keras, namex, optree; filelock 4.3 or newer), installed into a
# temporary folder. A run took 225 s on one H200 (docs/performance.md); on a 2-core CPU, 10
# minutes or more.
#
#     bash benchmarks/gpu_check.sh WHEELS [PYTHON]
#     STEPS=2 IMAGE_SIZE=64 bash benchmarks/gpu_check.sh WHEELS   # a quick trial (10, 200)
set -euo pipefail
cd "$(dirname "$0")/.."
wheels="${1:?usage: bash benchmarks/gpu_check.sh WHEELS [PYTHON]}"
python="${2:-python3}"
site="$(mktemp -d)"
runs="$(mktemp -d)"
"$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" KERAS_BACKEND=jax PYTHONUNBUFFERED=1
"$python" -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)"

"$python" mnist_siamese.py --data data/mnist-tiny.npz --epochs 3 --no-plots \
    --output-dir "$runs/mnist" > "$runs/mnist.log"
"$python" -c "import json, sys; m = json.load(open(sys.argv[1])); print('mnist_siamese.py, JAX:', \
round(m['seconds_per_epoch'], 3), 's per epoch (mean of 3, the first compiles)')" "$runs/mnist/metrics.json"

for cache in --cache-features --no-cache-features; do
    for precision in "" --no-mixed-precision; do
        echo "triplet step, JAX, $cache ${precision:-(default precision, mixed float16 on a GPU)}:"
        "$python" benchmarks/tll_step_time.py --steps "${STEPS:-10}" --image-size "${IMAGE_SIZE:-200}" \
            "$cache" $precision | grep -E "^(backend|steps|seconds_per_step|losses)"
    done
    echo "plain Keras ResNet50 step, JAX, $cache:"
    "$python" benchmarks/plain_resnet_step.py --steps "${STEPS:-10}" --image-size "${IMAGE_SIZE:-200}" "$cache" | grep -E "^(steps|seconds_per_step)"
done
rm -rf "$site" "$runs"
