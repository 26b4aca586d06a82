"""Audited training runs through the real DP step, and their report."""

import dataclasses
import io
import json
import math
import secrets
import time

import keras
import numpy as np
import tensorflow as tf

from keras_dpscale import dp_model
from keras_dpscale import optimizers
from keras_dpscale import sampling as sampling_lib
from keras_dpscale import storage
from keras_dpscale.auditing.canaries import DiracCanaries
from keras_dpscale.auditing.canaries import draw_inclusion
from keras_dpscale.auditing.canaries import input_space_canaries
from keras_dpscale.auditing.statistics import OneRunResult
from keras_dpscale.auditing.statistics import one_run_audit
from keras_dpscale.data.synthetic import synthetic_images

# ---------------------------------------------------------------------------
# Training with canaries.
# ---------------------------------------------------------------------------


def poisson_draws(rows, sampling_rate, steps, sampling_seed=None):
    """Which rows the sample of each step holds if they are in the training
    set: `[steps, rows]` booleans, each True with probability
    `sampling_rate`.

    The draws come from the operating system's entropy (a secret sample,
    fresh each run), unless `sampling_seed` is given: a public seed, for
    tests and for the audit of an adversary who knows the sample.
    """
    key = secrets.randbits(128) if sampling_seed is None else [sampling_seed, 4]
    return np.random.default_rng(key).random((steps, rows)) < sampling_rate


# The sampling that the optimizer calibrates sigma for, by recorded kind.
_PLANNED = {"poisson": "poisson", "public": "unknown"}


def sampling_of(sampling_seed):
    """How the audit's batches are drawn (recorded in the model's ledger):
    a secret Poisson sample, or a public one without amplification."""
    if sampling_seed is None:
        return sampling_lib.Sampling("poisson")
    return sampling_lib.Sampling("public")


def train_with_canaries(
    model,
    inputs,
    labels,
    in_training_set,
    *,
    steps,
    sampling_rate=1.0,
    learning_rate=1.0,
    l2_norm_clip=1.0,
    noise_multiplier=None,
    target_epsilon=None,
    delta=1e-5,
    accountant="pld",
    accumulation_steps=1,
    sampling_seed=None,
    noise_seed=None,
    observe=None,
):
    """Trains `model` with the library's DP-SGD on a masked row set.

    The candidate rows are the ordinary examples and all m canaries; the
    training set is the rows with `in_training_set` (excluded canaries never
    join a batch). Each step samples the training set with probability
    `sampling_rate` per row (`poisson_draws`), so the optimizer runs with
    `sampling="poisson"`, the logical batch size B = round(q N) and
    num_examples N = the number of candidate rows: public constants that do
    not depend on which canaries are included, as the one-run analysis
    requires. The accountant's epsilon is then exact for this sampling (and
    without amplification when `sampling_seed` makes the sample public).

    Args:
        model: a compiled-or-not `DPModel` (it is compiled here).
        inputs: the model's inputs for all rows (array or tuple of arrays).
        labels: `[rows]` int labels.
        in_training_set: `[rows]` booleans.
        steps: T, the number of DP-SGD steps.
        sampling_rate: q in (0, 1].
        learning_rate, l2_norm_clip, noise_multiplier, target_epsilon,
            accountant, noise_seed: as `DPSGD` (give noise_multiplier or
            target_epsilon).
        delta: the delta of the claimed epsilon.
        accumulation_steps: k; each step's rows are cut into k physical
            batches (padded with never-sampled rows to a multiple of k).
        sampling_seed: None (a secret sample) or a public seed.
        observe: optional `observe() -> array`, called after every logical
            step (a white-box adversary who sees every iterate).

    Returns:
        `(optimizer, draws, observations)`: the trained model's `DPSGD`,
        the `[steps, rows]` draws of `poisson_draws`, and the list of
        `observe()` values after each step (empty without `observe`).
    """
    if not 0 < sampling_rate <= 1:
        raise ValueError(
            f"sampling_rate must be in (0, 1], got {sampling_rate}."
        )
    labels = np.asarray(labels)
    rows = len(labels)
    batch_size = max(1, round(sampling_rate * rows))
    draws = poisson_draws(rows, batch_size / rows, steps, sampling_seed)
    sampling = sampling_of(sampling_seed)
    optimizer = optimizers.DPSGD(
        learning_rate=learning_rate,
        momentum=0.0,
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier,
        target_epsilon=target_epsilon,
        steps=steps if target_epsilon is not None else None,
        batch_size=batch_size,
        num_examples=rows,
        target_delta=delta,
        sampling=_PLANNED[sampling.kind],
        accountant=accountant,
        accumulation_steps=int(accumulation_steps),
        noise_seed=noise_seed,
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    masks = draws & np.asarray(in_training_set, bool)
    dataset = _masked_batches(inputs, labels, masks, int(accumulation_steps))
    sampling_lib.attach(dataset, sampling)
    observations = []
    callbacks = _observer(observe, int(accumulation_steps), observations)
    model.fit(dataset, epochs=1, verbose=0, callbacks=callbacks)
    if int(optimizer.iterations) != steps:
        raise RuntimeError(
            f"Training stopped after {int(optimizer.iterations)} of {steps} "
            "steps (privacy budget?)."
        )
    return optimizer, draws, observations


def _masked_batches(inputs, labels, masks, k):
    """The dataset of the k physical batches of each step, all rows masked.

    Args:
        inputs: the model's inputs for all rows (array or tuple of arrays).
        labels: `[rows]` labels.
        masks: `[steps, rows]` booleans: the rows in each step's sample.
        k: the accumulation steps.

    Returns:
        A `tf.data.Dataset` of `(features, labels, {MASK: mask})`, `k` per
        logical step; step t's physical batch j holds rows
        [j, j + 1) * (rows + padding) / k, padded with copies of row 0 that
        are never sampled.
    """
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    steps, rows = masks.shape
    padding = -rows % k

    def pad(a):
        return np.concatenate([a, np.repeat(a[:1], padding, 0)])

    chunks = [
        tf.constant(np.stack(np.split(pad(np.asarray(x)), k))) for x in inputs
    ]
    targets = tf.constant(np.stack(np.split(pad(labels), k)))
    masks = np.concatenate(
        [masks.astype(np.float32), np.zeros((steps, padding), np.float32)], 1
    ).reshape(steps * k, -1)

    def batch(index, mask):
        j = index % k
        features = tuple(c[j] for c in chunks)
        features = features if len(features) > 1 else features[0]
        return features, targets[j], {dp_model.MASK: mask}

    return tf.data.Dataset.from_tensor_slices(
        (np.arange(steps * k), masks)
    ).map(tf.autograph.experimental.do_not_convert(batch))


def _observer(observe, k, observations):
    """Callbacks that append `observe()` to `observations` after each
    logical step (every k physical batches); none without `observe`."""
    if observe is None:
        return []

    def on_train_batch_end(batch, logs):
        if (batch + 1) % k == 0:
            observations.append(observe())

    return [
        keras.callbacks.LambdaCallback(on_train_batch_end=on_train_batch_end)
    ]


@dataclasses.dataclass
class AuditResult:
    """An audited training run: the claim and the measured lower bound.

    Attributes:
        kind: "whitebox" or "blackbox".
        claimed_epsilon: epsilon of the run from the optimizer's ledger.
        delta: its delta (also the delta of the lower bound).
        one_run: the `OneRunResult`.
        scores: `[m]` canary scores.
        included: `[m]` booleans.
        settings: the run's settings (for the report).
        runtime_s: wall time of training and scoring.
    """

    kind: str
    claimed_epsilon: float
    delta: float
    one_run: OneRunResult
    scores: np.ndarray
    included: np.ndarray
    settings: dict
    runtime_s: float

    @property
    def epsilon_lower_bound(self):
        return self.one_run.epsilon_lower_bound

    @property
    def ratio(self):
        """Audited lower bound / claimed epsilon (1 would be a tight audit)."""
        if self.claimed_epsilon == 0:
            return math.inf if self.epsilon_lower_bound > 0 else 0.0
        return self.epsilon_lower_bound / self.claimed_epsilon

    def to_dict(self):
        """The report's JSON fields (scores summarized, not listed)."""
        included = np.asarray(self.included, bool)
        return dict(
            kind=self.kind,
            claimed_epsilon=self.claimed_epsilon,
            delta=self.delta,
            epsilon_lower_bound=self.epsilon_lower_bound,
            confidence=self.one_run.confidence,
            ratio=self.ratio,
            detected=bool(self.epsilon_lower_bound > self.claimed_epsilon),
            m=self.one_run.m,
            num_included=self.one_run.num_included,
            num_guesses=self.one_run.num_guesses,
            num_correct=self.one_run.num_correct,
            k_plus=self.one_run.k_plus,
            k_minus=self.one_run.k_minus,
            tried=self.one_run.tried,
            score_mean_included=float(np.mean(self.scores[included])),
            score_mean_excluded=float(np.mean(self.scores[~included])),
            settings=self.settings,
            runtime_s=self.runtime_s,
        )


def _audit(
    kind,
    model,
    scores,
    included,
    delta,
    confidence,
    guess_counts,
    settings,
    start,
):
    optimizer = model.optimizer
    claimed = float(model.epsilon(delta))
    settings = dict(
        settings,
        noise_multiplier=float(optimizer.noise_multiplier),
        batch_size=int(optimizer.batch_size),
        num_examples=int(optimizer.num_examples),
        privacy_statement=model.privacy_statement(delta),
    )
    return AuditResult(
        kind=kind,
        claimed_epsilon=claimed,
        delta=delta,
        one_run=one_run_audit(
            scores, included, delta, confidence, guess_counts
        ),
        scores=np.asarray(scores, np.float64),
        included=np.asarray(included, bool),
        settings=settings,
        runtime_s=time.time() - start,
    )


def whitebox_audit(
    num_canaries=1000,
    num_ordinary=256,
    num_features=8,
    num_classes=3,
    steps=10,
    sampling_rate=1.0,
    learning_rate=1.0,
    l2_norm_clip=1.0,
    noise_multiplier=None,
    target_epsilon=4.0,
    delta=1e-5,
    accumulation_steps=1,
    canary_gradient_norm=10.0,
    confidence=0.95,
    guess_counts=None,
    seed=0,
    sampling_seed=None,
    noise_seed=None,
    adversary="final",
):
    """One-run white-box audit of the DP step with Dirac canaries.

    A linear classifier on `num_ordinary` synthetic examples, followed by
    `DiracCanaries(m)`; m canary rows, each included with probability 1/2
    (`draw_inclusion`). Trains with `train_with_canaries` (the real
    `DPModel` step and `DPSGD`), scores each canary, and runs
    `one_run_audit`. With `sampling_rate` 1 the run is the Gaussian
    mechanism composed T times, whose epsilon the accountant states exactly,
    and the final v is a sufficient statistic for it: the setting in which
    the one-run audit is tightest.

    Two adversaries score canary i:

    - "final": v_i(T) - v_i(0), from the final weights;
    - "knows_sampling": an adversary who sees every iterate and knows which
      steps would hold canary i (the sample's seed is public): the sum of
      canary i's coordinate's moves over those steps only. Its noise is
      that of the steps holding the canary, not of all T steps, so
      subsampling amplifies nothing. It needs `sampling_seed` (a secret
      sample cannot be known); with the library's honest accounting of a
      public sample the claim stays above its bound, while a ledger that
      counts such a sample as secret Poisson sampling (the bug this audit
      shows) is caught.

    Args:
        num_canaries: m.
        num_ordinary, num_features, num_classes: the ordinary data.
        steps, sampling_rate, learning_rate, l2_norm_clip, noise_multiplier,
            target_epsilon, delta, accumulation_steps, noise_seed: see
            `train_with_canaries`.
        canary_gradient_norm: see `DiracCanaries`.
        confidence, guess_counts: see `one_run_audit`.
        seed: the seed of the data, the inclusion and (through
            `keras.utils.set_random_seed`, a global setting) the model's
            initialization. The sample has its own `sampling_seed` (None:
            secret) and the noise its own `noise_seed`.
        sampling_seed: see `train_with_canaries`.
        adversary: "final" or "knows_sampling" (see above).

    Returns:
        An `AuditResult`.
    """
    _check_adversary(adversary, sampling_seed)
    start = time.time()
    keras.utils.set_random_seed(seed)
    inputs, labels = _linear_task(
        num_ordinary, num_features, num_classes, num_canaries, seed
    )
    included = draw_inclusion(num_canaries, seed)
    model, canaries = _dirac_model(
        num_features, num_classes, num_canaries, canary_gradient_norm
    )
    score, observe = _dirac_adversary(canaries, adversary, num_ordinary)
    return _train_and_audit(
        "whitebox",
        model,
        inputs,
        labels,
        included,
        num_ordinary,
        score=score,
        training=_training(locals()),
        observe=observe,
        settings=dict(
            num_canaries=num_canaries,
            num_ordinary=num_ordinary,
            canary_gradient_norm=canary_gradient_norm,
            adversary=adversary,
            seed=seed,
        ),
        confidence=confidence,
        guess_counts=guess_counts,
        start=start,
    )


def _check_adversary(adversary, sampling_seed):
    """Raises ValueError for an unknown adversary, or one that would know a
    secret sample."""
    if adversary not in ("final", "knows_sampling"):
        raise ValueError(f"Unknown adversary {adversary!r}.")
    if adversary == "knows_sampling" and sampling_seed is None:
        raise ValueError(
            "The 'knows_sampling' adversary needs a public sampling_seed: a "
            "secret sample cannot be known."
        )


def _linear_task(num_ordinary, num_features, num_classes, num_canaries, seed):
    """The white-box audit's rows: ordinary examples, then m canaries.

    Ordinary example i has Gaussian features, the label of a random linear
    teacher and canary index -1; canary i has zero features, label 0 and
    canary index i.

    Returns:
        `((features, canary_index), labels)` for all rows.
    """
    rng = np.random.default_rng([seed, 5])
    teacher = rng.normal(size=(num_features, num_classes))
    x = rng.normal(size=(num_ordinary, num_features))
    y = np.argmax(x @ teacher, axis=1)
    m = num_canaries
    features = np.concatenate([x, np.zeros((m, num_features))])
    index = np.concatenate([-np.ones(num_ordinary), np.arange(m)])
    labels = np.concatenate([y, np.zeros(m)]).astype(np.int32)
    return (features.astype(np.float32), index.astype(np.int32)), labels


def _dirac_model(num_features, num_classes, num_canaries, gradient_norm):
    """A linear classifier followed by `DiracCanaries`: `(model, canaries)`."""
    features = keras.Input((num_features,), name="features")
    canary_index = keras.Input((), dtype="int32", name="canary_index")
    logits = keras.layers.Dense(num_classes)(features)
    canaries = DiracCanaries(num_canaries, gradient_norm)
    model = dp_model.DPModel(
        [features, canary_index], canaries([logits, canary_index])
    )
    return model, canaries


def _dirac_adversary(canaries, adversary, num_ordinary):
    """How the white-box adversary scores the canaries (`whitebox_audit`).

    Returns:
        `(score, observe)`: `score(draws, iterates)` gives the `[m]` canary
        scores; `observe()` (None for "final") records the canary weights
        after each step.
    """
    initial = canaries.canary_weights.numpy().copy()

    def final(draws, iterates):
        return canaries.canary_weights.numpy() - initial

    if adversary == "final":
        return final, None

    def knows_sampling(draws, iterates):
        # Each step's move of each canary's coordinate, summed over the
        # steps whose sample would hold that canary.
        moves = np.diff(np.stack([initial] + iterates), axis=0)
        return np.sum(moves * draws[:, num_ordinary:], axis=0)

    return knows_sampling, lambda: canaries.canary_weights.numpy().copy()


def blackbox_audit(
    num_canaries=500,
    canary_kind="mislabeled",
    num_ordinary=2000,
    image_size=8,
    num_classes=10,
    hidden_units=64,
    steps=100,
    sampling_rate=0.2,
    learning_rate=0.5,
    l2_norm_clip=1.0,
    noise_multiplier=None,
    target_epsilon=8.0,
    delta=1e-5,
    accumulation_steps=1,
    confidence=0.95,
    guess_counts=None,
    seed=0,
    sampling_seed=None,
    noise_seed=None,
):
    """One-run black-box audit with input-space canaries (images).

    A small MLP on synthetic images (`synthetic_images`) plus m canary images
    (`input_space_canaries`: mislabeled or out-of-distribution), each
    included with probability 1/2. After DP training, the score of a canary
    is minus its loss under the final model (only the model's outputs are
    used: black box).

    Args:
        num_canaries: m.
        canary_kind: "mislabeled" or "ood".
        num_ordinary, image_size, num_classes: the ordinary data.
        hidden_units: width of the MLP's hidden layer.
        steps, sampling_rate, learning_rate, l2_norm_clip, noise_multiplier,
            target_epsilon, delta, accumulation_steps, noise_seed: see
            `train_with_canaries`.
        confidence, guess_counts: see `one_run_audit`.
        seed: the seed of the data, the inclusion and (through
            `keras.utils.set_random_seed`, a global setting) the model's
            initialization. The sample has its own `sampling_seed` (None:
            secret) and the noise its own `noise_seed`.
        sampling_seed: see `train_with_canaries`.

    Returns:
        An `AuditResult`.
    """
    start = time.time()
    keras.utils.set_random_seed(seed)
    x, y = synthetic_images(num_ordinary, seed, image_size, num_classes)
    cx, cy = input_space_canaries(
        num_canaries, canary_kind, image_size, num_classes, seed
    )
    included = draw_inclusion(num_canaries, seed)
    model = dp_model.DPSequential(
        [
            keras.Input(x.shape[1:]),
            keras.layers.Flatten(),
            keras.layers.Dense(hidden_units, activation="relu"),
            keras.layers.Dense(num_classes),
        ]
    )

    def score(draws, iterates):  # black box: minus each canary's loss
        logits = model.predict(cx, batch_size=1024, verbose=0)
        losses = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=None
        )(cy, logits)
        return -np.asarray(losses, np.float64)

    return _train_and_audit(
        "blackbox",
        model,
        np.concatenate([x, cx]),
        np.concatenate([y, cy]),
        included,
        num_ordinary,
        score=score,
        training=_training(locals()),
        settings=dict(
            num_canaries=num_canaries,
            canary_kind=canary_kind,
            num_ordinary=num_ordinary,
            seed=seed,
        ),
        confidence=confidence,
        guess_counts=guess_counts,
        start=start,
    )


# The arguments of `train_with_canaries` that both audits take.
_TRAINING = (
    "steps",
    "sampling_rate",
    "learning_rate",
    "l2_norm_clip",
    "noise_multiplier",
    "target_epsilon",
    "delta",
    "accumulation_steps",
    "sampling_seed",
    "noise_seed",
)


def _training(arguments):
    return {name: arguments[name] for name in _TRAINING}


def _train_and_audit(
    kind,
    model,
    inputs,
    labels,
    included,
    num_ordinary,
    score,
    training,
    settings,
    confidence,
    guess_counts,
    start,
    observe=None,
):
    """Trains on the ordinary rows and the included canaries, then audits.

    `score(draws, iterates)` scores the canaries from the sample's draws
    and the `observe()` values after each step."""
    in_training_set = np.concatenate([np.ones(num_ordinary, bool), included])
    _, draws, iterates = train_with_canaries(
        model, inputs, labels, in_training_set, observe=observe, **training
    )
    public = {
        k: v
        for k, v in training.items()
        if k not in ("noise_seed", "noise_multiplier", "delta")
    }
    return _audit(
        kind,
        model,
        score(draws, iterates),
        included,
        training["delta"],
        confidence,
        guess_counts,
        dict(settings, **public),
        start,
    )


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def write_report(result, output_dir):
    """Writes `report.json` and `scores.png` (histograms, in vs out).

    Args:
        result: an `AuditResult`.
        output_dir: the folder (created if needed): a local path or a URL
            such as `gs://bucket/audit` (written through `tf.io.gfile`).

    Returns:
        `(json_path, png_path)`.
    """
    storage.makedirs(output_dir)
    json_path = storage.join(output_dir, "report.json")
    storage.write_text(json_path, json.dumps(result.to_dict(), indent=2))
    import matplotlib  # lazily: only the report needs it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    included = np.asarray(result.included, bool)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(result.scores, bins=40)
    ax.hist(result.scores[included], bins, alpha=0.6, label="included")
    ax.hist(result.scores[~included], bins, alpha=0.6, label="excluded")
    ax.set_xlabel("canary score")
    ax.set_ylabel("canaries")
    ax.set_title(
        f"{result.kind}: claimed eps {result.claimed_epsilon:.3g}, audited "
        f">= {result.epsilon_lower_bound:.3g} "
        f"({100 * result.one_run.confidence:g}%)",
        fontsize=9,
    )
    ax.legend()
    png_path = storage.join(output_dir, "scores.png")
    with io.BytesIO() as png:
        fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        storage.write_bytes(png_path, png.getvalue())
    return json_path, png_path
