"""keras_dpscale: differentially private training (DP-SGD) for Keras 3.

Installing, by host (what pip really does):

* CPU, or a host whose TensorFlow is the `tensorflow` distribution (the
  usual wheel; `tensorflow[and-cuda]` is the same distribution plus NVIDIA's
  CUDA wheels): `pip install -e .`. The requirement `tensorflow>=2.20,<2.21`
  is already satisfied, so pip keeps that TensorFlow (check with
  `pip install -e . --dry-run`: no "tensorflow" in "Would install").
* GPU host from scratch: `pip install -e ".[and-cuda]"` (TensorFlow's own
  extra, as TensorFlow's install guide names it: `tensorflow[and-cuda]`).
* A host whose TensorFlow is another distribution, e.g. `tensorflow-tpu`
  (TensorFlow's TPU guide: `pip install tensorflow-tpu -f
  https://storage.googleapis.com/libtpu-releases/index.html`) or
  `tensorflow-cpu`: pip matches requirements by distribution name, not by
  the `tensorflow` module they all install, so it would see `tensorflow` as
  missing and install it into the same `site-packages/tensorflow` directory,
  over the host's. An extra cannot help: extras only add requirements, so a
  "tpu" extra would still pull `tensorflow` (and then both would be there).
  Instead, leave TensorFlow out of the requirements:

      KERAS_DPSCALE_TF=none pip install -e .     # keeps the host's TF

  (or `pip install --no-deps -e .` and install the requirements below but
  TensorFlow by hand). `KERAS_DPSCALE_TF=<requirement>` names another
  distribution instead, e.g. `KERAS_DPSCALE_TF="tensorflow-tpu>=2.20,<2.21"`.
  The variable is read when pip builds this package's metadata (a local
  source build always does; it reaches pip's isolated build environment).

Pins: TensorFlow 2.20, the release the whole suite passes on. 2.21.0 runs
the tests that lean on TensorFlow's and Keras' private internals
(`tools/compat_check.sh`, with Keras 3.15.1), but the whole suite on it
(2026-12-01) found its C++ log lines printed at import whatever
`TF_CPP_MIN_LOG_LEVEL` says (the tools' one-line errors and quiet console
fail) and TensorBoard no longer installed with it; raise the upper pin only
after the whole suite passes. Keras: the release tested, 3.15.x;
`keras_dpscale._compat` imports Keras internals (`keras.src`) that move
between minor versions, so a new minor is allowed only once it is tested
(`COMPAT_KERAS="keras==3.16.0" bash tools/compat_check.sh`).
"""

import os

import setuptools

TENSORFLOW = "tensorflow>=2.20,<2.21"
_tf = os.environ.get("KERAS_DPSCALE_TF", "").strip()
if _tf.lower() == "none":
    tensorflow = []
elif _tf:
    tensorflow = [_tf]
else:
    tensorflow = [TENSORFLOW]

setuptools.setup(
    name="keras_dpscale",
    version="0.1.0",
    description="DP-SGD for Keras 3 at the accuracy of De et al. 2022.",
    packages=setuptools.find_packages(
        include=["keras_dpscale", "keras_dpscale.*"]
    ),
    python_requires=">=3.10",
    install_requires=tensorflow
    + [
        "keras>=3.15.1,<3.16",  # tested: 3.15.1 (with TF 2.20; 2.21 subset)
        "dp-accounting>=0.6",
        "gin-config>=0.5",
        "absl-py>=2.0",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",  # tfds 4.9.10 needs it to load
        "numpy",
        "scipy>=1.11",  # auditing statistics (also a dp-accounting dependency)
        # The TensorBoard callback of the launchers: TensorFlow 2.21 no
        # longer installs it.
        "tensorboard",
    ],
    extras_require={
        # GPU hosts: TensorFlow with NVIDIA's CUDA/cuDNN wheels (Linux).
        "and-cuda": [TENSORFLOW.replace("tensorflow", "tensorflow[and-cuda]")],
        "plot": ["matplotlib"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "matplotlib",
            "hypothesis>=6.100",
        ],
    },
)
