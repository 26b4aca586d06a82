"""`Plan`: the public shape of a run, which every builder shares."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the data, the optimizer and the training loop must agree on.

    All of it is public (it is written to the run's config): the privacy
    accounting depends on it, never on the data's content.

    Attributes:
        batch_size: B, the (expected) logical batch size.
        epochs: the training length: `steps(N)` logical steps in all.
        accumulation_steps: physical batches per logical batch (one replica
            only, for now).
        sampling: "poisson" (the default pipeline) or "shuffle".
        seed: seed of the initialization and the augmentations (never of
            the Poisson sample, which is secret and fresh: `data.poisson`).
        target_delta: delta of the reported (epsilon, delta) guarantee.
    """

    batch_size: int
    epochs: int
    accumulation_steps: int = 1
    sampling: str = "poisson"
    seed: int = 0
    target_delta: float = 1e-5

    def steps_per_epoch(self, num_examples):
        """Logical steps per epoch over N examples: round(N / B), >= 1."""
        return max(1, round(num_examples / self.batch_size))

    def steps(self, num_examples):
        """T, the logical steps of the whole run: epochs * round(N / B)."""
        return self.epochs * self.steps_per_epoch(num_examples)
