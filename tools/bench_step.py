"""Times the DP-SGD step against the non-private step of the same model.

    python tools/bench_step.py                 # WRN-16-4, 32x32, b 64, 256
    python tools/bench_step.py --depth 10 --width 1 --batch_sizes 32,64
    python tools/bench_step.py --engines vectorized --conv_grad while_loop

For each batch size it prints the median step time of the non-private step
(Keras' own train_step with SGD) and of the DP step (per-example clipping,
noise) with each clipping engine ("fast": ghost norms and book-keeping;
"vectorized": per-example gradients by tf.vectorized_map), the DP/non-
private time ratio, and the peak resident memory of the steps (the
process's high-water mark, reset after compilation) and its ratio, beside
the peak including XLA compilation.

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


def build(engine, batch_size):
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
    return model, x, y


def measure_memory(engine, batch_size):
    """Peak resident memory of one model's steps, in this process."""
    model, x, y = build(engine, batch_size)
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


def measure_times(engines, batch_size):
    """Step times of all engines' models, their steps taken in turn."""
    models = {engine: build(engine, batch_size) for engine in engines}
    times = {engine: [] for engine in engines}
    for _ in range(FLAGS.steps):
        for engine, (model, x, y) in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[engine].append(time.perf_counter() - start)
    base = times["non-private"]
    return {
        engine: {
            "median_s": statistics.median(t),
            "ratio": statistics.median(a / b for a, b in zip(t, base)),
        }
        for engine, t in times.items()
    }


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


def run_child(task, batch_size):
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        f"--_child={task};{batch_size}",
    ] + [a for a in sys.argv[1:] if not a.startswith("--_child")]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


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
    print(
        f"{'batch':>5} {'step':>12} {'median s':>9} {'time ratio':>10} "
        f"{'peak MB':>8} {'mem ratio':>9} {'peak MB incl. compile':>21}"
    )
    engines = ["non-private"] + FLAGS.engines
    for batch_size in map(int, FLAGS.batch_sizes):
        times = run_child("times:" + ",".join(engines), batch_size)
        memory = {engine: run_child(engine, batch_size) for engine in engines}
        base = memory["non-private"]["peak_rss_mb"]
        for engine in engines:
            t, m = times[engine], memory[engine]
            print(
                f"{batch_size:>5} {engine:>12} {t['median_s']:>9.3f}"
                f" {t['ratio']:>9.2f}x"
                f" {m['peak_rss_mb']:>8.0f}"
                f" {m['peak_rss_mb'] / base:>8.2f}x"
                f" {m['peak_with_compile_mb']:>21.0f}",
                flush=True,
            )
        if FLAGS.augmult:
            rate = input_examples_per_second(batch_size, FLAGS.augmult)
            print(
                f"      input pipeline (augmult K={FLAGS.augmult}): "
                f"{rate:,.0f} examples/s = {rate * FLAGS.augmult:,.0f} "
                f"images/s; the DP step consumes "
                f"{batch_size / times[engines[-1]]['median_s']:,.0f} images/s",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
