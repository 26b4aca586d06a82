"""Times the DP-SGD step against the non-private step of the same model.

    python tools/bench_step.py                 # WRN-16-4, 32x32, b 64, 256
    python tools/bench_step.py --depth 10 --width 1 --batch_sizes 32,64
    python tools/bench_step.py --engines vectorized --conv_grad while_loop
    python tools/bench_step.py --batch_sizes 256,1024 \
        --dtypes float32,bfloat16 --nomemory          # an accelerator

For each batch size it prints the median step time of the non-private step
(Keras' own train_step with SGD) and of the DP step (per-example clipping,
noise) with each clipping engine ("fast": ghost norms and book-keeping;
"vectorized": per-example gradients by tf.vectorized_map), the DP/non-
private time ratio, and the peak resident memory of the steps (the
process's high-water mark, reset after compilation) and its ratio, beside
the peak including XLA compilation. It also prints images/s (batch size
over the median step time). `--dtypes float32,bfloat16` times each model
in float32 and under Keras' `mixed_bfloat16` policy, each DP step against
the non-private step of the same dtype. `--nomemory` skips the memory
measurement (host RSS, which says little on an accelerator) and its
processes.

Times come from one process that holds every model and runs their steps
in turn (non-private, DP, non-private, ...), so that a slower period of a
shared machine slows all of them alike; the time ratio is the median of
the ratios within each round. Memory comes from a fresh process per model.
All steps are XLA-compiled; the first steps (compilation) are not timed.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

flags.DEFINE_integer("depth", 16, "WRN depth (6n+4).")
flags.DEFINE_integer("width", 4, "WRN widening factor.")
flags.DEFINE_integer("image_size", 32, "Image height and width.")
flags.DEFINE_list("batch_sizes", ["64", "256"], "Physical batch sizes.")
flags.DEFINE_list(
    "engines", ["fast", "vectorized"], "DPSGD clipping engines to time."
)
flags.DEFINE_list(
    "dtypes",
    ["float32"],
    "Precisions: float32 and/or bfloat16 (Keras' mixed_bfloat16 policy).",
)
flags.DEFINE_bool(
    "memory", True, "Measure the peak resident memory (a process per model)."
)
flags.DEFINE_integer("steps", 5, "Timed rounds (one step of each model).")
flags.DEFINE_integer("warmup", 2, "Untimed steps (compilation) per run.")
flags.DEFINE_integer("microbatch_size", None, "DPSGD microbatch_size.")
flags.DEFINE_enum(
    "conv_grad",
    "per_offset",
    ["per_offset", "while_loop"],
    "The vectorized engine's per-example conv filter gradients: "
    "keras_dpscale.engines.pfor_conv's batched matmul per kernel offset, or "
    "TensorFlow's own pfor converter (a while_loop over examples).",
)
flags.DEFINE_integer(
    "augmult",
    0,
    "If > 0, also time the augmult input pipeline (K views per example) "
    "and print its examples/s next to the DP step's.",
)
flags.DEFINE_string("_child", None, "Internal: run one measurement.")
FLAGS = flags.FLAGS


def build(engine, batch_size, dtype="float32"):
    """A compiled model of `engine` and one batch of random data."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    import keras_dpscale as kd
    from keras_dpscale.engines import pfor_conv
    from keras_dpscale.models import wide_resnet

    if FLAGS.conv_grad == "while_loop":
        # The engines install the converter when they trace: keep TF's.
        pfor_conv.install = pfor_conv.uninstall

    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if dtype == "bfloat16" else "float32"
    )
    model = wide_resnet(
        FLAGS.depth,
        FLAGS.width,
        input_shape=(FLAGS.image_size, FLAGS.image_size, 3),
        private=engine != "non-private",
    )
    if engine != "non-private":
        optimizer = kd.DPSGD(
            learning_rate=0.1,
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
        )
        step = dict(microbatch_size=FLAGS.microbatch_size, clipping=engine)
    else:
        optimizer = keras.optimizers.SGD(learning_rate=0.1)
        step = {}
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
        **step,
    )
    rng = np.random.default_rng(0)
    shape = (batch_size, FLAGS.image_size, FLAGS.image_size, 3)
    x = rng.normal(size=shape).astype("float32")
    y = rng.integers(0, 10, size=(batch_size,)).astype("int32")
    for _ in range(FLAGS.warmup):  # compilation
        model.train_on_batch(x, y)
    keras.mixed_precision.set_global_policy("float32")
    return model, x, y


def measure_memory(key, batch_size):
    """Peak resident memory of one model's steps, in this process."""
    dtype, engine = key.split("/")
    model, x, y = build(engine, batch_size, dtype)
    with_compile = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # From here on, the peak of the training steps alone (Linux).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(2):
        model.train_on_batch(x, y)
    return {
        "peak_rss_mb": _high_water_mark_mb(),
        "peak_with_compile_mb": with_compile,
        "params": model.count_params(),
    }


def measure_times(keys, batch_size):
    """Step times of the models `keys` ("dtype/engine"), steps in turn.

    A model that fails to build or compile (e.g. out of memory) is reported
    with its error instead of times; the others are still timed.
    """
    models, failed = {}, {}
    for key in keys:
        dtype, engine = key.split("/")
        try:
            models[key] = build(engine, batch_size, dtype)
        except Exception as e:  # noqa: BLE001 -- reported in the table
            failed[key] = {"error": f"{type(e).__name__}: {e}"[:200]}
    times = {key: [] for key in models}
    for _ in range(FLAGS.steps):
        for key, (model, x, y) in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[key].append(time.perf_counter() - start)
    import tensorflow as tf

    accelerators = [
        d.name
        for d in tf.config.list_physical_devices()
        if d.device_type != "CPU"
    ]
    result = dict(failed, _devices=", ".join(accelerators) or "none")
    for key, t in times.items():
        base = times.get(key.split("/")[0] + "/non-private")
        result[key] = {
            "median_s": statistics.median(t),
            "ratio": statistics.median(a / b for a, b in zip(t, base))
            if base
            else float("nan"),
        }
    return result


def _high_water_mark_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def input_examples_per_second(batch_size, num_views, batches=50):
    """Examples/s that `data.train_dataset` (Poisson) delivers with augmult."""
    import numpy as np
    import tensorflow as tf

    from keras_dpscale import data

    size = FLAGS.image_size
    images = np.random.default_rng(0).integers(
        0, 256, (10_000, size, size, 3), np.uint8
    )
    examples = tf.data.Dataset.from_tensor_slices((images, np.zeros(10_000)))
    ds = iter(data.train_dataset(examples, batch_size, num_views=num_views))
    for _ in range(5):  # warm up the pipeline
        next(ds)
    start = time.perf_counter()
    for _ in range(batches):
        next(ds)
    return batches * batch_size / (time.perf_counter() - start)


def run_child(task, batch_size, check=True):
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        f"--_child={task};{batch_size}",
    ] + [a for a in sys.argv[1:] if not a.startswith("--_child")]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode or not lines:
        if not check:
            return {"error": _last_error(out.stderr)}
        raise RuntimeError(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def _last_error(stderr):
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    return (lines[-1] if lines else "no output")[:200]


def main(_):
    if FLAGS._child:
        task, batch_size = FLAGS._child.split(";")
        if task.startswith("times:"):
            result = measure_times(task[6:].split(","), int(batch_size))
        else:
            result = measure_memory(task, int(batch_size))
        print(json.dumps(result))
        return
    name = f"WRN-{FLAGS.depth}-{FLAGS.width}"
    print(
        f"{name} (GroupNorm, pre-activation), {FLAGS.image_size}x"
        f"{FLAGS.image_size}x3, {os.cpu_count()} CPUs, XLA, "
        f"{FLAGS.steps} rounds of steps, microbatch_size="
        f"{FLAGS.microbatch_size}, conv filter gradients: {FLAGS.conv_grad}"
    )
    memory_header = (
        f" {'peak MB':>8} {'mem ratio':>9} {'peak MB incl. compile':>21}"
        if FLAGS.memory
        else ""
    )
    print(
        f"{'model':>9} {'batch':>5} {'dtype':>8} {'step':>12} "
        f"{'median s':>9} {'images/s':>9} {'time ratio':>10}" + memory_header,
        flush=True,
    )
    engines = ["non-private"] + FLAGS.engines
    for batch_size in map(int, FLAGS.batch_sizes):
        times = {}
        for dtype in FLAGS.dtypes:  # a process per (batch, dtype): partial
            keys = [f"{dtype}/{e}" for e in engines]  # results come early
            result = run_child("times:" + ",".join(keys), batch_size, False)
            if "error" in result:  # the whole child failed
                result = {key: result for key in keys}
            elif "_devices" in result and not times:
                if batch_size == int(FLAGS.batch_sizes[0]):
                    print(f"accelerators: {result['_devices']}", flush=True)
            times.update(result)
            memory = {}
            if FLAGS.memory:
                memory = {
                    e: run_child(f"{dtype}/{e}", batch_size, check=False)
                    for e in engines
                }
            base = memory.get("non-private", {}).get("peak_rss_mb")
            for engine in engines:
                t = times[f"{dtype}/{engine}"]
                row = f"{name:>9} {batch_size:>5} {dtype:>8} {engine:>12}"
                if "error" in t:
                    print(f"{row} failed: {t['error']}", flush=True)
                    continue
                row += (
                    f" {t['median_s']:>9.4f}"
                    f" {batch_size / t['median_s']:>9.0f}"
                    f" {t['ratio']:>9.2f}x"
                )
                m = memory.get(engine, {})
                if "peak_rss_mb" in m:
                    ratio = m["peak_rss_mb"] / base if base else float("nan")
                    row += (
                        f" {m['peak_rss_mb']:>8.0f}"
                        f" {ratio:>8.2f}x"
                        f" {m['peak_with_compile_mb']:>21.0f}"
                    )
                elif FLAGS.memory:
                    row += f" memory failed: {m.get('error')}"
                print(row, flush=True)
        if FLAGS.augmult:
            last = times.get(f"{FLAGS.dtypes[-1]}/{engines[-1]}", {})
            rate = input_examples_per_second(batch_size, FLAGS.augmult)
            consumes = (
                f"{batch_size / last['median_s']:,.0f}"
                if "median_s" in last
                else "?"
            )
            print(
                f"      input pipeline (augmult K={FLAGS.augmult}): "
                f"{rate:,.0f} examples/s = {rate * FLAGS.augmult:,.0f} "
                f"images/s; the DP step consumes {consumes} images/s",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
