"""The DP training launcher for Cloud TPU: `tools/train.py` with TPUStrategy.

    python tools/train_tpu.py --config configs/imagenet_nfnet_f3.gin \
        --tpu=$TPU_NAME --model_dir=gs://bucket/run --data_dir=gs://bucket/tfds

Same flags as `tools/train.py` (`--data_dir`: where tfds finds the prepared
datasets); `--strategy` defaults to "tpu" (on a TPU VM, `--tpu=local`).
Without a TPU it says so in one line ("train_tpu.py: no TPU found ...") and
exits with code 1. `--dry_run` checks a config anywhere: without a TPU it
says so and builds the data (synthetic if absent), model and optimizer and
compiles one DP step on the default strategy (see `tools/train.py`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import train  # noqa: E402

flags.FLAGS.set_default("strategy", "tpu")

if __name__ == "__main__":
    app.run(train.main)
