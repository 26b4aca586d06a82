"""Times the DP-SGD step against the non-private step of the same model.

    python tools/bench_step.py                 # WRN-16-4, 32x32, b 64, 256
    python tools/bench_step.py --depth 10 --width 1 --batch_sizes 32,64
    python tools/bench_step.py --model vit --batch_sizes 64   # ViT-6-192
    python tools/bench_step.py --model vit --lora_rank 8      # LoRA only
    python tools/bench_step.py --model convnext               # ConvNeXt
    python tools/bench_step.py --model mixed                  # modern layers
    python tools/bench_step.py --model dpnasnet --image_size 28 \
        --batch_sizes 256 --engines fast          # DPNASNet, Fashion-MNIST
    python tools/bench_step.py --engines vectorized --conv_grad while_loop
    python tools/bench_step.py --batch_sizes 256,1024 \
        --dtypes float32,bfloat16 --nomemory          # an accelerator

`--model` picks the network (32x32 by default, 10 classes): "wrn" (WRN-
`depth`-`width` with GroupNorm), "vit" (`models.vit`: 6 pre-LN blocks of
width 192, 3 heads, patches of 4; with `--lora_rank`, LoRA fine-tuning of
the attention and MLP layers), "convnext" (`models.convnext`: widths 48,
96, 192, two blocks each), "dpnasnet" (`models.dpnasnet`, on grey
images) or "mixed" (`mixed_model`: DepthwiseConv2D,
SeparableConv2D, Conv1D, MultiHeadAttention, EinsumDense, LayerNorm and a
Dense with LoRA in one small net). Every layer of each has a rule of the
fast engine (no per-example gradients by the vectorized path).

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
import re
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

flags.DEFINE_enum(
    "model",
    "wrn",
    ["wrn", "vit", "convnext", "mixed", "dpnasnet"],
    "The network.",
)
flags.DEFINE_integer("depth", 16, "WRN depth (6n+4); --model wrn only.")
flags.DEFINE_integer("width", 4, "WRN widening factor; --model wrn only.")
flags.DEFINE_integer(
    "lora_rank",
    None,
    "--model vit only: LoRA of this rank on the attention and MLP layers; "
    "only the LoRA factors and the head train.",
)
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


def model_name():
    """The network's name in the table, and its description."""
    if FLAGS.model == "vit":
        lora = f", LoRA rank {FLAGS.lora_rank}" if FLAGS.lora_rank else ""
        return "ViT-6-192", f"pre-LN, 3 heads, patch 4{lora}"
    if FLAGS.model == "convnext":
        return "ConvNeXt", "widths 48/96/192, depths 2/2/2, LayerNorm"
    if FLAGS.model == "mixed":
        return "mixed", "depthwise, separable, Conv1D, attention, LoRA"
    if FLAGS.model == "dpnasnet":
        return "DPNASNet", "Cheng et al. 2022's Fashion-MNIST cell, grey"
    return f"WRN-{FLAGS.depth}-{FLAGS.width}", "GroupNorm, pre-activation"


def image_shape():
    """`--image_size` images, grey for DPNASNet, else RGB."""
    channels = 1 if FLAGS.model == "dpnasnet" else 3
    return (FLAGS.image_size, FLAGS.image_size, channels)


def make_model(private):
    """The network of `--model` for `--image_size` images, 10 classes."""
    from keras_dpscale import models

    input_shape = image_shape()
    if FLAGS.model == "vit":
        return models.vit(
            input_shape=input_shape, lora_rank=FLAGS.lora_rank, private=private
        )
    if FLAGS.model == "convnext":
        return models.convnext(input_shape=input_shape, private=private)
    if FLAGS.model == "mixed":
        return mixed_model(input_shape, private)
    if FLAGS.model == "dpnasnet":
        return models.dpnasnet(input_shape=input_shape, private=private)
    return models.wide_resnet(
        FLAGS.depth, FLAGS.width, input_shape=input_shape, private=private
    )


def mixed_model(input_shape, private, num_classes=10):
    """A small net of the layers of modern backbones, each with its fast
    rule: Conv2D, DepthwiseConv2D, SeparableConv2D, Conv1D, RMSNormalization,
    MultiHeadAttention, EinsumDense, LayerNormalization, and a Dense with
    LoRA (rank 8) before the head."""
    import keras

    import keras_dpscale as kd

    layers = keras.layers
    inputs = keras.Input(input_shape)
    h = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(
        inputs
    )
    h = layers.DepthwiseConv2D(3, padding="same", activation="relu")(h)
    h = layers.SeparableConv2D(64, 3, strides=2, padding="same")(h)
    h = layers.Reshape((-1, 64))(h)
    h = layers.Conv1D(64, 3, padding="same", activation="gelu")(h)
    h = layers.RMSNormalization()(h)
    a = layers.MultiHeadAttention(4, 16)(h, h)
    h = layers.Add()([h, a])
    h = layers.EinsumDense(
        "abc,cd->abd", (None, 128), bias_axes="d", activation="gelu"
    )(h)
    h = layers.LayerNormalization()(h)
    h = layers.GlobalAveragePooling1D()(h)
    lora_dense = layers.Dense(128, activation="relu")
    h = lora_dense(h)
    outputs = layers.Dense(num_classes, name="head")(h)
    model = (kd.DPModel if private else keras.Model)(inputs, outputs)
    lora_dense.enable_lora(8)
    return model


def build(engine, batch_size, dtype="float32"):
    """A compiled model of `engine` and one batch of random data."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    import keras_dpscale as kd
    from keras_dpscale.engines import pfor_conv

    if FLAGS.conv_grad == "while_loop":
        # The engines install the converter when they trace: keep TF's.
        pfor_conv.install = pfor_conv.uninstall

    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if dtype == "bfloat16" else "float32"
    )
    model = make_model(private=engine != "non-private")
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
    shape = (batch_size, *image_shape())
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

    images = np.random.default_rng(0).integers(
        0, 256, (10_000, *image_shape()), np.uint8
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
    # A child that printed its result may still crash on exit (TensorFlow
    # can abort while freeing after an out-of-memory error): keep the result.
    if not lines:
        if not check:
            return {"error": _last_error(out.stderr)}
        raise RuntimeError(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def _last_error(stderr):
    """The last line that names an error (not what a crash printed after
    it), else the last line."""
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    errors = [l for l in lines if re.search(r"\w(Error|Exception)\b", l)]
    return ((errors or lines or ["no output"])[-1]).strip()[:200]


def main(_):
    if FLAGS.lora_rank and FLAGS.model != "vit":
        raise app.UsageError("--lora_rank is for --model vit.")
    if FLAGS._child:
        task, batch_size = FLAGS._child.split(";")
        if task.startswith("times:"):
            result = measure_times(task[6:].split(","), int(batch_size))
        else:
            result = measure_memory(task, int(batch_size))
        print(json.dumps(result))
        return
    name, description = model_name()
    print(
        f"{name} ({description}), {'x'.join(map(str, image_shape()))}, "
        f"{os.cpu_count()} CPUs, XLA, "
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
