"""`build_data`: a run's training and evaluation data, read from a data dir.

A config never names a location. It names a dataset (`build_data.dataset`)
and, if it reads one, an ImageFolder archive or directory (`image_folder`)
or the archives tfds prepares from (`manual_dir`), both relative to the
data directory. The data directory comes from the launcher's `--data_dir`
flag, else the `KERAS_DPSCALE_DATA_DIR` environment variable, else
`../shared/data` beside the repository's root (`default_data_dir`). tfds
reads its prepared datasets from the same directory (local or `gs://`).
"""

import dataclasses
import os
from typing import Any
from typing import Callable

import gin
import numpy as np
import tensorflow as tf

from keras_dpscale import data
from keras_dpscale import export
from keras_dpscale import layers
from keras_dpscale import sampling as sampling_lib
from keras_dpscale.data import imagenet
from keras_dpscale.data import sources
from keras_dpscale.engines import separability
from keras_dpscale.experiment import public
from keras_dpscale.experiment.plan import Plan

DATA_DIR_ENV = "KERAS_DPSCALE_DATA_DIR"
# The root of the source checkout that holds this package.
REPOSITORY = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)

gin.external_configurable(imagenet.preprocess, "imagenet_preprocess")
gin.external_configurable(imagenet.augmult_crops, "imagenet_augmult_crops")
gin.external_configurable(data.random_crop_flip, "random_crop_flip")
gin.external_configurable(layers.Scattering2D, module="keras_dpscale.layers")


def default_data_dir():
    """The data directory when the launcher is given none.

    Returns:
        `$KERAS_DPSCALE_DATA_DIR` if set, else `../shared/data` beside the
        root of the repository (source checkout) that holds this package.
    """
    return os.environ.get(DATA_DIR_ENV) or os.path.normpath(
        os.path.join(REPOSITORY, os.pardir, "shared", "data")
    )


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The data of a run, as `build_data` found it.

    Attributes:
        plan: the run's `Plan`.
        examples: the training examples: a `tf.data.Dataset` held in memory,
            or a random-access source (`tfds.data_source`).
        num_examples: N, their number (public: the accountant needs it).
        train_kwargs: the arguments of `data.train_dataset` but `steps`.
        eval_examples: a function returning the unbatched eval examples.
        eval_batch_size: the evaluation batch size.
        eval_preprocess: per-example preprocessing of evaluation images.
        eval_name: what the evaluation reads: "test" (the eval split,
            whatever tfds calls it: ImageNet's is "validation") or
            "validation" (examples held out of the training set).
        source: where the examples came from: "tfds", "image_folder" or
            "debian" (`data.sources.load_with_source`).
        features: the fixed feature map that made `examples` from the
            images (`featurize`), or None.
        image_shape: with `features`, the shape of one image it takes.
    """

    plan: Plan
    examples: Any
    num_examples: int
    train_kwargs: dict
    eval_examples: Callable[[], Any]
    eval_batch_size: int = 1000
    eval_preprocess: Any = None
    eval_name: str = "test"
    source: str = None
    features: Any = None
    image_shape: tuple = None

    @property
    def steps_per_epoch(self):
        """Logical steps per epoch: round(N / B)."""
        return self.plan.steps_per_epoch(self.num_examples)

    def train_dataset(self, strategy, initial_epoch=0):
        """Training batches from the start of epoch `initial_epoch` on.

        Poisson: a fresh secret sample of the steps left (nothing is
        replayed; `checkpoint.Checkpoint` skips the batches of that epoch
        already trained on). Shuffle: the deterministic stream, skipped to
        where that epoch starts. One pipeline per host
        (`distribute_datasets_from_function`) with several replicas.
        """
        plan, kwargs = self.plan, dict(self.train_kwargs)
        done = initial_epoch * self.steps_per_epoch
        if plan.sampling == "poisson":
            kwargs["steps"] = plan.steps(self.num_examples) - done
        drawn = []

        def dataset_fn(input_context=None):
            ds = data.train_dataset(
                self.examples, input_context=input_context, **kwargs
            )
            drawn.append(sampling_lib.of(ds))
            if plan.sampling == "shuffle":  # resume the stream in place
                local = 1
                if input_context is not None:
                    local = (
                        input_context.num_replicas_in_sync
                        // input_context.num_input_pipelines
                    )
                ds = ds.skip(done * plan.accumulation_steps * local)
            return ds

        if strategy.num_replicas_in_sync > 1:
            train = strategy.distribute_datasets_from_function(dataset_fn)
        else:
            train = dataset_fn()
        if drawn:
            sampling_lib.attach(train, drawn[0])
        return train

    def eval_dataset(self):
        """The batched evaluation split."""
        return data.eval_dataset(
            self.eval_examples(),
            self.eval_batch_size,
            preprocess=self.eval_preprocess,
        )


@gin.configurable(denylist=["plan", "data_dir"])
def build_data(
    plan,
    data_dir=None,
    *,
    dataset="fashion_mnist",
    image_folder=None,
    manual_dir=None,
    random_access=False,
    eval_split="test",
    validation_size=None,
    source=None,
    preprocess=None,
    eval_preprocess=None,
    features=None,
    augment=None,
    augmult=None,
    overflow_probability=1e-18,
    eval_batch_size=1000,
):
    """Finds the training and evaluation data of a run.

    Args:
        plan: the run's `Plan` (B, sampling, accumulation, seed).
        data_dir: the data directory (see the module docstring); None:
            `default_data_dir()`.
        dataset: a name for `data.load` ("fashion_mnist", "cifar10", ...).
        image_folder, manual_dir: `data.load` sources, relative to
            `data_dir` (an absolute path is taken as it is).
        random_access: read the training set by index through
            `tfds.data_source` (ArrayRecord data; ImageNet) instead of
            holding it in memory (Poisson sampling only).
        eval_split: the split evaluated at the end.
        validation_size: hold out the last `validation_size` training
            examples (which ones depends on no data; the examples
            themselves are private): the run trains on the others
            (N shrinks, and the accountant counts the smaller N) and is
            evaluated on them instead of `eval_split`. For tuning: the test
            set is then never read (`tools/sweep.py`).
        source: read the data from this source only ("tfds",
            "image_folder", "debian"; `data.sources.load_with_source`);
            None: the first that works for the training split. The
            evaluation split always comes from the training split's source.
        preprocess: per-example preprocessing of training images (e.g.
            `imagenet_preprocess` with `train=True`); default: scaling to
            [-1, 1]. `eval_preprocess`: the same for evaluation.
        features: a fixed feature map of the normalized images that no
            private example shapes (e.g. `@keras_dpscale.layers.Scattering2D()`,
            or a network trained here on public data,
            `@keras_dpscale.experiment.PublicPretraining()`), computed
            once for every training and evaluation example
            (`featurize`); the model then takes the features. In
            memory only (not with `random_access`, `preprocess` or
            `augmult`). The SavedModel applies the map to the images it
            serves; the result and the privacy record name it.
        augment: the augmentation of the augmult views (default: mirror
            padded crops and flips, `@random_crop_flip` to bind its
            padding; `imagenet_augmult_crops()` for ImageNet).
        augmult: K views per example (augmentation multiplicity), or None.
        overflow_probability: Poisson padding bound (see `data.poisson`).
        eval_batch_size: evaluation batch size.

    Returns:
        The `Inputs` of the run.
    """
    if features is not None and (
        random_access or preprocess or eval_preprocess or augmult
    ):
        raise ValueError(
            "features= maps in-memory images once: it does not combine with "
            "random_access, preprocess, eval_preprocess or augmult."
        )
    data_dir = data_dir or default_data_dir()
    where = dict(
        data_dir=data_dir,
        image_folder=_within(data_dir, image_folder),
        manual_dir=_within(data_dir, manual_dir),
    )
    examples, num_examples, source = _training_examples(
        dataset, random_access, where, source
    )

    def eval_examples():  # from the training split's source, never another
        return data.load(dataset, eval_split, source=source, **where)

    if validation_size:
        examples, num_examples, eval_examples = _hold_out(
            examples, num_examples, validation_size, random_access
        )
    image_shape = None
    if features is not None:
        examples, eval_examples, image_shape, features = _featurized(
            examples, eval_examples, features, where, dataset
        )
    train_kwargs = dict(
        batch_size=plan.batch_size,
        seed=plan.seed,
        sampling=plan.sampling,
        num_views=augmult,
        accumulation_steps=plan.accumulation_steps,
    )
    if plan.sampling == "poisson":
        train_kwargs["overflow_probability"] = overflow_probability
    if preprocess is not None:
        train_kwargs["preprocess"] = preprocess
    if augment is not None:
        train_kwargs["augment"] = augment
    return Inputs(
        plan=plan,
        examples=examples,
        num_examples=num_examples,
        train_kwargs=train_kwargs,
        eval_examples=eval_examples,
        eval_batch_size=eval_batch_size,
        eval_preprocess=eval_preprocess,
        eval_name="validation" if validation_size else "test",
        source=source,
        features=features,
        image_shape=image_shape,
    )


def _featurized(examples, eval_examples, features, where, dataset):
    """`examples` and `eval_examples` through `features`, the shape of one
    image before, and the map (a `PublicPretraining` trained here)."""
    image_shape = tuple(examples.element_spec[0].shape)
    if isinstance(features, public.PublicPretraining):
        features = features.train(
            image_shape,
            dict(
                where,
                image_folder=_within(where["data_dir"], features.image_folder),
            ),
            private_dataset=dataset,
            private_folder=where["image_folder"],
        )

    def featurized_eval_examples():
        return featurize(eval_examples(), features)

    return (
        featurize(examples, features),
        featurized_eval_examples,
        image_shape,
        features,
    )


def featurize(examples, features, batch_size=1000):
    """Maps every image once through a fixed feature map, in memory.

    For models trained on hand-crafted features (`layers.Scattering2D`,
    Tramer & Boneh 2021): the map must not depend on the data (it is public
    and fixed, like the normalization before it: the user's claim, as for
    pre-trained weights). It is applied to each example alone (a batch of
    one under `tf.vectorized_map`, which computes what a loop over the
    examples would: `export.features_of_each`, which serves the exported
    model too), so a map that mixes the examples of a batch (a batch
    mean, a batch normalization) cannot make one example's features depend
    on another. The one way left, state that an example writes and another
    reads (a variable), is refused: the traced map must not write data of
    the example into a variable or hand it to Python code (the check of the
    vectorized clipping engine, `separability.call_alone`; the
    XLA compilation refuses Python functions too). Computing the features
    once, instead of in every DP step, makes the step cost that of the
    small model on top.

    Args:
        examples: a `tf.data.Dataset` of `(uint8 image, label)`.
        features: a function (such as a Keras layer without weights) from a
            batch of normalized images `[n, H, W, C]` to `[n, ...]` float
            features.
        batch_size: images per call of `features`.

    Returns:
        A `tf.data.Dataset` of `(float32 features, label)`, in memory, in
        the order of `examples`; `data.normalize` passes the features through.

    Raises:
        ValueError: the map writes an example's data into state, or
            `examples` is empty.
    """

    def checked(image):  # a batch of one; no state carries it to another
        return separability.call_alone(features, image, "The feature map")

    mapped = tf.function(
        lambda x: export.features_of_each(checked, data.normalize(x)),
        jit_compile=True,
    )
    xs, ys = [], []
    for images, labels in examples.batch(batch_size):
        xs.append(mapped(images).numpy())
        ys.append(labels.numpy())
    if not xs:
        raise ValueError("featurize was given no examples.")
    return tf.data.Dataset.from_tensor_slices(
        (np.concatenate(xs).astype(np.float32, copy=False), np.concatenate(ys))
    )


def _training_examples(dataset, random_access, where, source=None):
    """The training split, its size N and its source, in memory or by
    index."""
    if random_access:  # read by index (tfds ArrayRecord data; ImageNet)
        import tensorflow_datasets as tfds

        examples = tfds.data_source(
            dataset, split="train", data_dir=where["data_dir"]
        )
        return examples, len(examples), "tfds"
    examples, source = sources.load_with_source(
        dataset, "train", source=source, **where
    )
    num_examples = int(examples.cardinality())
    if num_examples < 0:
        num_examples = sum(1 for _ in examples)
    return examples, num_examples, source


def _hold_out(examples, num_examples, validation_size, random_access):
    """The training examples but the last `validation_size`, and those."""
    if not isinstance(validation_size, int):
        raise ValueError(
            f"validation_size must be an int, got {validation_size!r}."
        )
    if random_access:
        raise ValueError(
            "validation_size needs the training set in memory "
            "(random_access=False)."
        )
    if not 0 < validation_size < num_examples:
        raise ValueError(
            f"validation_size must be in (0, {num_examples}), got "
            f"{validation_size}."
        )
    kept = num_examples - validation_size
    return examples.take(kept), kept, lambda: examples.skip(kept)


def _within(data_dir, path):
    """`path` relative to `data_dir` (None stays None)."""
    return None if path is None else os.path.join(data_dir, path)
