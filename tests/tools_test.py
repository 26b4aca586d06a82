"""The launchers' checks without an accelerator: tools/device_check.sh
--quick, tools/train.py --dry_run on every paper config, train_tpu.py
without a TPU."""

import glob
import json
import os
import re
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}


def test_device_check_quick_prints_its_figures():
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "tools", "device_check.sh"), "--quick"],
        capture_output=True,
        text=True,
        env=ENV,
        check=False,
        timeout=600,
    )
    text = out.stdout
    # The benchmark: each dtype x step, with s/step, images/s and a ratio.
    for dtype in ("float32", "bfloat16"):
        for step in ("non-private", "fast", "vectorized"):
            row = rf"WRN-4-1 +4 +{dtype} +{step} +[\d.]+ +\d+ +[\d.]+x"
            assert re.search(row, text), (row, text[-3000:])
    assert "device_check: bench WRN-4-1 ok" in text
    result = r"DP run: test accuracy [\d.]+, epsilon [\d.]+ at delta 1e-05"
    assert re.search(r"WRN-4-1 \(synthetic data\) " + result, text), text
    # The full recipe's time from the run's step time (here WRN-4-1's).
    assert re.search(r"device_check: full recipe from WRN-4-1", text), text
    assert re.search(r"device_check: estimate: [\d.]+ h", text), text
    mirrored = re.search(r"DP run, mirrored: test accuracy [\d.]+", text)
    assert mirrored, text[-3000:]
    assert out.returncode == 0, text[-3000:]
    assert re.search(r"device_check: done in \d+ s, exit code 0", text)


# Each paper config, shrunk (width, resolution, augmult; batch 4 per physical
# step) and on synthetic data (an empty data_dir). "step": compile (XLA) and
# run one logical DP step; else build the data, model and optimizer only.
# WRN-40-4 (depth 40) and NFNet-F3 are built only: their DP step's XLA
# compilation takes minutes on 2 CPU cores; the CIFAR eps1/2/4 configs share
# eps8's model and step (cifar10_wrn_base.gin).
IMAGENET_32 = [
    "train/imagenet_preprocess.image_size = 32",
    "eval/imagenet_preprocess.image_size = 32",
    "imagenet_augmult_crops.image_size = 32",
    "build_data.augmult = 2",
]
DRY_RUNS = {
    "cifar10_quick.gin": (False, []),
    "fashion_mnist_dpnas.gin": (
        True,
        ["build_model.model_kwargs = {'width': 4, 'head_width': 16}"],
    ),
    "cifar10_wrn_16_4_eps8.gin": (
        True,
        ['build_model.model = "wrn_16_1"', "build_data.augmult = 2"],
    ),
    "cifar10_wrn_16_4_eps1.gin": (False, []),
    "cifar10_wrn_16_4_eps2.gin": (False, []),
    "cifar10_wrn_16_4_eps4.gin": (False, []),
    "cifar10_wrn_40_4_eps8.gin": (False, ['build_model.model = "wrn_40_1"']),
    "imagenet_nf_resnet50_eps8.gin": (
        True,
        IMAGENET_32
        + [
            (
                "build_model.model_kwargs = {'num_classes': 1000, "
                "'input_shape': (32, 32, 3), 'width': 0.25}"
            )
        ],
    ),
    "imagenet_nfnet_f3.gin": (
        False,
        IMAGENET_32
        + [
            (
                "build_model.model_kwargs = {'num_classes': 1000, "
                "'input_shape': (32, 32, 3), 'width': 0.125, "
                "'dropout_rate': 0.0, 'stochdepth_rate': 0.0}"
            )
        ],
    ),
}

# One process for all of them (TensorFlow starts once).
DRIVER = """
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "tools"))
import gin
import keras
import train
from keras_dpscale import distribute, experiment

for config, step, bindings in json.loads(sys.argv[3]):
    gin.clear_config()
    keras.backend.clear_session()
    experiment.parse_config([os.path.join(sys.argv[1], "configs", config)],
                            bindings)
    summary = train.dry_run(distribute.make_strategy("default"), sys.argv[2],
                            4, config, step=step)
    print("SUMMARY " + json.dumps([config, summary]), flush=True)
"""


def test_every_paper_config_has_a_dry_run():
    paper = {
        os.path.basename(p)
        for p in glob.glob(os.path.join(ROOT, "configs", "cifar10_*.gin"))
        + glob.glob(os.path.join(ROOT, "configs", "imagenet_*.gin"))
    } | {"fashion_mnist_dpnas.gin"}  # DPNAS's recipe, for an accelerator
    paper.discard("cifar10_wrn_base.gin")  # included, not run alone
    assert paper == set(DRY_RUNS)


def test_dry_run_of_each_paper_config(tmp_path):
    runs = [[c, step, b] for c, (step, b) in DRY_RUNS.items()]
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, ROOT, str(tmp_path), json.dumps(runs)],
        capture_output=True,
        text=True,
        env=ENV,
        check=False,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    summaries = dict(
        json.loads(line[len("SUMMARY ") :])
        for line in out.stdout.splitlines()
        if line.startswith("SUMMARY ")
    )
    assert set(summaries) == set(DRY_RUNS)
    for config, (step, _) in DRY_RUNS.items():
        summary = summaries[config]
        assert summary["params"] > 0 and summary["noise_multiplier"] > 0
        if step:
            assert summary["steps"] == 1, (config, summary)
            assert all(None not in shape for shape in summary["shapes"])
    assert "synthetic stand-in (random access)" in out.stdout  # ImageNet
    assert summaries["imagenet_nf_resnet50_eps8.gin"]["model"] == "nf_resnet_50"
    assert summaries["imagenet_nfnet_f3.gin"]["model"] == "nfnet_f3"
    assert summaries["fashion_mnist_dpnas.gin"]["model"] == "dpnasnet"


def failed_in_one_line(tool, model_dir):
    """Runs `tools/<tool> --model_dir=...`, which must fail; returns the one
    line it printed (on stderr)."""
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", tool),
            f"--model_dir={model_dir}",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        check=False,
        timeout=300,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_train_tpu_without_a_tpu_says_so_in_one_line(tmp_path):
    line = failed_in_one_line("train_tpu.py", tmp_path / "run")
    assert line.startswith("train_tpu.py: no TPU found"), line
    # model_dir was checked (created, probed) first; nothing was written.
    assert not list((tmp_path / "run").iterdir())


def test_train_with_an_unwritable_model_dir_says_so_in_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = failed_in_one_line("train.py", blocker / "run")
    assert line.startswith("train.py: model_dir"), line
    assert "not writable" in line
