"""keras_dpscale: differentially private training (DP-SGD) for Keras 3."""

import setuptools

setuptools.setup(
    name="keras_dpscale",
    version="0.1.0",
    description="DP-SGD for Keras 3 at the accuracy of De et al. 2022.",
    packages=setuptools.find_packages(
        include=["keras_dpscale", "keras_dpscale.*"]
    ),
    python_requires=">=3.10",
    install_requires=[
        # The CPU wheel; on GPU/TPU machines install `tensorflow` instead.
        "tensorflow-cpu>=2.20,<2.21",
        "keras>=3.10,<4",
        "dp-accounting>=0.6",
        "gin-config>=0.5",
        "absl-py>=2.0",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",  # tfds 4.9.10 needs it to load
        "numpy",
        "scipy>=1.11",  # auditing statistics (also a dp-accounting dependency)
    ],
    extras_require={
        "plot": ["matplotlib"],
        "test": ["pytest>=8", "matplotlib", "hypothesis>=6.100"],
    },
)
