"""How the batches were drawn: what the accountant may assume about them.

The epsilon of DP-SGD depends on how each step's batch was drawn, and only
the input pipeline knows that. Every training dataset therefore carries a
`Sampling` that says it (`attach`, read back by `of`), and a `DPModel`'s
`fit` reads it to account for what ran:

| kind | what it means | how it is accounted |
|---|---|---|
| "poisson" | each example joins each step independently with probability B/N, from a secret sample drawn afresh for every pass (the library's pipelines, and `fit` on arrays) | Poisson-subsampled Gaussian (amplification by sampling) |
| "shuffle" | each pass over the data holds each example at most once (shuffled fixed-size batches) | one Gaussian mechanism per pass: ceil(T / floor(N/B)) releases, no amplification |
| "public" | Poisson sampling from a known seed (`public_sampling_seed=`, for tests): whoever knows the seed knows which steps hold each example | as "unknown" |
| "unknown" | anything else: a pipeline the library cannot see into | one Gaussian mechanism per step (every example may be in every step) |

All kinds assume only that which rows form a batch does not depend on the
examples' values, and use the add/remove relation in which a removed
example's rows become padding (zero gradient). A `Sampling` made by the
library's pipelines is `declared=False`; `declare` records a user's own
claim about a pipeline of theirs, and the privacy statement says whose
claim it is.

Padded Poisson batches carry a mask in the sample-weight slot of the batch,
`(x, y, {MASK: mask})`: 1 for a sampled example, 0 for padding.
"""

import dataclasses
import logging

# The key under which a padded batch carries its 0/1 mask.
MASK = "dp_mask"

KINDS = ("poisson", "shuffle", "unknown", "public")

_ATTRIBUTE = "_keras_dpscale_sampling"
_log = logging.getLogger("keras_dpscale")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a training pipeline draws its batches.

    Attributes:
        kind: one of `KINDS` (see the module docstring).
        overflow_probability: for padded Poisson batches, an upper bound on
            the probability that a step's sample does not fit the padded
            rows and is truncated (it adds to delta).
        declared: the user's claim (`declare`), not the library's pipeline.
        batch_size, num_examples: the expected logical batch size B and the
            training set size N that a Poisson pipeline samples with (rate
            B/N); None where the pipeline does not say. `fit` checks them
            against the optimizer's: the accountant uses the optimizer's.
        accumulation_steps: the physical batches a pipeline cuts each
            sample into (per replica); None where it does not say. `fit`
            refuses an optimizer that accumulates another number (its
            noised sums would hold several samples, or part of one).
    """

    kind: str
    overflow_probability: float = 0.0
    declared: bool = False
    batch_size: int | None = None
    num_examples: int | None = None
    accumulation_steps: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(
                f"sampling must be one of {KINDS}, got {self.kind!r}."
            )
        if not 0 <= self.overflow_probability <= 1:
            raise ValueError(
                "overflow_probability must be in [0, 1], got "
                f"{self.overflow_probability}."
            )

    @property
    def amplified(self):
        """True if the accountant may use amplification by sampling."""
        return self.kind == "poisson"


UNKNOWN = Sampling("unknown")


def attach(dataset, sampling):
    """Returns `dataset`, marked as drawn by `sampling` (the library's own
    pipelines call this). A transformation of the dataset (`map`, `skip`,
    ...) makes a new object without the mark: the library can no longer see
    what it does, and accounts for it as "unknown"."""
    setattr(dataset, _ATTRIBUTE, sampling)
    return dataset


def declare(dataset, kind, overflow_probability=0.0):
    """States how a pipeline of the user's own draws its batches.

    The privacy statement then names the claim as the user's. Declare
    "poisson" only for a sample that is secret and drawn afresh for every
    pass; "shuffle" only if every pass over the data holds each example at
    most once.

    Args:
        dataset: the training data given to `fit`.
        kind: "poisson", "shuffle" or "unknown".
        overflow_probability: see `Sampling`.

    Returns:
        `dataset`, marked.
    """
    return attach(dataset, Sampling(kind, overflow_probability, declared=True))


def of(data):
    """The `Sampling` of training data; `UNKNOWN` if it carries none."""
    return getattr(data, _ATTRIBUTE, UNKNOWN)
