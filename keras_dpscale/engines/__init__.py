"""The per-example clipping engines: norms -> clip -> sum of one physical batch.

Two engines compute the same sum of per-example gradients clipped to norm
<= C, differently:

- "fast" (`engines.fast`): per-example norms by ghost norms and the
  clipped sum by book-keeping, from one forward and one backward pass,
  with per-layer rules (`keras_dpscale.rules`); it proves on the traced
  computation that no example reaches another (`engines.separability`)
  and raises `Unsupported` for what it does not cover.
- "vectorized" (`engines.vectorized`): per-example gradients of the whole
  model by `tf.vectorized_map`.

`select` makes the engine a model compiles with; "auto" tries "fast" at
the first trace and stays with "vectorized" if it does not cover the model
(logged once).
"""

import logging

import tensorflow as tf

from keras_dpscale import rules
from keras_dpscale._compat import keras_private
from keras_dpscale.engines import fast
from keras_dpscale.engines import losses as losses_lib
from keras_dpscale.engines import vectorized

ENGINES = ("auto", "fast", "vectorized")
Unsupported = rules.Unsupported
_LOG = logging.getLogger("keras_dpscale")


def select(clipping="auto", microbatch_size=None):
    """The engine for `model.compile(clipping=..., microbatch_size=...)`.

    Args:
        clipping: "fast", "vectorized", or "auto" ("fast" where it covers
            the model and no `microbatch_size` is set, else "vectorized":
            the fast engine in chunks measured 6x slower, docs/performance).
        microbatch_size: examples per chunk of per-example work; trades
            speed for memory and changes nothing else. None: the whole
            physical batch at once.
    """
    if clipping not in ENGINES:
        raise ValueError(
            f"clipping must be one of {ENGINES}, got {clipping!r}."
        )
    if microbatch_size is not None and (
        int(microbatch_size) != microbatch_size or microbatch_size < 1
    ):
        raise ValueError(
            "microbatch_size must be None or an integer >= 1, got "
            f"{microbatch_size}."
        )
    if clipping == "auto" and microbatch_size is not None:
        clipping = "vectorized"
    engine = ClippingEngine(clipping, microbatch_size)
    _LOG.info("Per-example clipping: %s.", engine)
    return engine


class ClippingEngine:
    """The sum of clipped per-example gradients of one physical batch.

    Args:
        clipping: "fast", "vectorized" or "auto" (see `select`).
        microbatch_size: see `select`.
    """

    def __init__(self, clipping, microbatch_size=None):
        self.clipping = clipping
        self.microbatch_size = microbatch_size
        self.chosen = None if clipping == "auto" else clipping

    def __repr__(self):
        chunks = (
            ""
            if self.microbatch_size is None
            else f" in chunks of {self.microbatch_size}"
        )
        chosen = self.chosen or "fast where it covers the model"
        return f"clipping={self.clipping!r} ({chosen}{chunks})"

    def clipped_gradient_sum(self, model, x, y, mask, l2_norm_clip):
        """The sum over a batch of per-example gradients clipped to norm
        <= C, before noise.

        Args:
            model: the DP model.
            x, y: a batch (`x` with K views per example for augmult).
            mask: optional `[B]` 0/1 weights of a padded Poisson batch.
            l2_norm_clip: C.

        Returns:
            `(grad_sum, losses, y_pred)`: one float32 sum per trainable
            variable, the per-example losses `[B]`, and the predictions.
        """
        variables = model.trainable_variables
        _check_no_regularizers(variables)
        views = losses_lib.num_views(model, x)
        seed_generators = keras_private.seed_generators(model)
        batch = tf.shape(tf.nest.flatten(x)[0])[0]
        # One independent seed per example for dropout and other random ops.
        seeds = [
            tf.random.experimental.stateless_split(
                tf.cast(sg.state, tf.int64), batch
            )
            for sg in seed_generators
        ]
        examples = ((x,) if y is None else (x, y)) + (seeds,)

        def unpack(inputs):
            *xy, s = inputs
            return (xy[0], None, s) if y is None else (*xy, s)

        args = (variables, examples, l2_norm_clip, self.microbatch_size, mask)
        if self.chosen in (None, "fast"):

            def batch_loss(inputs):
                xb, yb, s = unpack(inputs)
                return losses_lib.batch_losses(
                    model, xb, yb, seed_generators, s, views
                )

            try:
                result = fast.clipped_gradient_sum(
                    model, batch_loss, *args, num_seeds=1
                )
            except Unsupported as e:
                self._fall_back(e)
            else:
                self.chosen = "fast"
                return result

        def example_loss(inputs):
            xi, yi, s = unpack(inputs)
            return losses_lib.per_example_loss(
                model, xi, yi, seed_generators, s, views
            )

        return vectorized.clipped_gradient_sum(example_loss, *args)

    def _fall_back(self, reason):
        if self.clipping == "fast":
            raise ValueError(
                "clipping='fast' cannot compute this model's per-example "
                f"norms exactly: {reason}. Use clipping='vectorized' or "
                "'auto'."
            ) from reason
        if self.chosen != "vectorized":
            _LOG.info(
                "clipping='auto': the vectorized engine, because %s.", reason
            )
        self.chosen = "vectorized"


def _check_no_regularizers(variables):
    for v in variables:
        if getattr(v, "regularizer", None) is not None:
            raise ValueError(
                f"The variable '{v.path}' has a weight regularizer, which "
                "would add the same data-independent term to every example's "
                "gradient before clipping. Remove it and use the optimizer's "
                "`weight_decay` instead."
            )
