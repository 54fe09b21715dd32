#!/usr/bin/env bash
# The GPU check: on a machine with a GPU and JAX but without TensorFlow or Keras, measure
# what users run, each script's own epoch, beside its compiled step:
#   1. mnist_siamese.py under JAX on a 60,000-digit stand-in made from data/mnist-tiny.npz
#      (benchmarks/make_mnist_standin.py: 104,140 training pairs; full MNIST gives 108,400),
#      4 epochs: the epochs' seconds from the run's metrics.json; then
#      benchmarks/epoch_split.py on the same command (compilation, the time in and out of
#      the compiled steps, the benchmark step) and the ratio of the script's epoch after the
#      first to the benchmark's steps (benchmarks/epoch_ratio.py); then the script again
#      with --steps-per-execution 1, its epochs only, to compare with the default;
#   2. triplet_totally_looks_like.py the same way, on generated pairs at 200 x 200, batch 32,
#      weights none; then the step benchmark of earlier checks, benchmarks/tll_step_time.py.
# It installs nothing from a network: WHEELS is a folder of the wheels that machine lacks
# (Keras and what it needs: keras, namex, optree; filelock 4.3 or newer), installed into a
# temporary folder. It is meant to take under 5 minutes on a GPU; on a 2-core CPU, with
# PAIRS=60 IMAGE_SIZE=96 EPOCHS=2 (a trial of the script), 2 minutes.
#
#     bash benchmarks/gpu_check.sh WHEELS [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
wheels="${1:?usage: bash benchmarks/gpu_check.sh WHEELS [PYTHON]}"
python="${2:-python3}"
pairs="${PAIRS:-600}" image_size="${IMAGE_SIZE:-200}" epochs="${EPOCHS:-4}"
site="$(mktemp -d)"
runs="$(mktemp -d)"
"$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" KERAS_BACKEND=jax PYTHONUNBUFFERED=1
"$python" -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)"

# Runs SCRIPT with FLAGS as a user would; prints its epochs' seconds.
epochs_only() {
    local name="$1" script="$2"
    shift 2
    echo "== $name: python $script $*"
    "$python" "$script" "$@" --epochs "$epochs" --no-plots --output-dir "$runs/$name" \
        > "$runs/$name.log" 2>&1 || { tail -5 "$runs/$name.log"; return 1; }
    "$python" -c "import json, sys; m = json.load(open(sys.argv[1])); print('epoch_seconds', \
m['epoch_seconds'], 'steps_per_execution', m.get('steps_per_execution'))" "$runs/$name/metrics.json"
}

# The same, then the script under epoch_split.py, and the ratio of the two.
measure() {
    local name="$1" script="$2"
    epochs_only "$@"
    shift 2
    "$python" benchmarks/epoch_split.py "$script" "$@" --epochs 3 --no-plots \
        --output-dir "$runs/$name-split" > "$runs/$name-split.log" 2>&1 \
        || { tail -5 "$runs/$name-split.log"; return 1; }
    sed -n '/^traces:/,$p' "$runs/$name-split.log"
    "$python" benchmarks/epoch_ratio.py "$runs/$name/metrics.json" "$runs/$name-split.log"
}

"$python" benchmarks/make_mnist_standin.py "${MNIST_DATA:-data/mnist-tiny.npz}" "$runs/mnist-60k.npz"
measure mnist mnist_siamese.py --data "$runs/mnist-60k.npz"
epochs_only mnist-one-step mnist_siamese.py --data "$runs/mnist-60k.npz" --steps-per-execution 1

"$python" tools/make_synthetic_tll.py --pairs "$pairs" --image-size "$image_size" "$runs/tll"
triplet=(--data-dir "$runs/tll" --weights none --image-size "$image_size")
measure triplet triplet_totally_looks_like.py "${triplet[@]}"
epochs_only triplet-one-step triplet_totally_looks_like.py "${triplet[@]}" --steps-per-execution 1
echo "== the triplet step benchmark (cached features, the script's default precision):"
"$python" benchmarks/tll_step_time.py --steps 10 --image-size "$image_size" \
    | grep -E "^(backend|steps|seconds_per_step)"
rm -rf "$site" "$runs"
