"""Export a DP-trained `.keras` model as a SavedModel with its privacy record.

    python tools/export.py --model_path run/model.keras --output_dir served/
    # the raw weights instead of the optimizer's averages, epsilon at 1e-6
    python tools/export.py --model_path run/model.keras --output_dir served/ \
        --no_ema --delta 1e-6

The `.keras` file must come from `model.save` of a model trained with a DP
optimizer: it holds the optimizer, its privacy ledger and, with
`use_ema=True`, the parameter averages. Prints the privacy record and the
output path. See `keras_dpscale.export` for how to read the SavedModel.
A model trained on a fixed feature map (`build_data.features`) is exported
on the features, and its record does not name the map: the `.keras` file
does not hold it (`keras_dpscale.export_saved_model(..., features=...)`
does; the launcher's own export passes it).
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

flags.DEFINE_string("model_path", None, "A `.keras` file.", required=True)
flags.DEFINE_string(
    "output_dir", None, "Where the SavedModel goes.", required=True
)
flags.DEFINE_float("delta", None, "delta (default: the optimizer's).")
flags.DEFINE_bool(
    "no_ema", False, "Export the raw weights, not the parameter averages."
)
FLAGS = flags.FLAGS


def main(_):
    logging.set_verbosity(logging.ERROR)
    import keras_dpscale

    model = keras_dpscale.load_model(FLAGS.model_path)
    record = keras_dpscale.export_saved_model(
        model, FLAGS.output_dir, use_ema=not FLAGS.no_ema, delta=FLAGS.delta
    )
    print(json.dumps(record, indent=2, sort_keys=True))
    print(f"SavedModel written to {FLAGS.output_dir}")


if __name__ == "__main__":
    app.run(main)
