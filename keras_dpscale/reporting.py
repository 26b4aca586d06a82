"""Privacy reporting of a DP model: epsilon, the statement, the budget.

Mixed into `DPTrainer`: thin methods over the model's ledger
(`keras_dpscale.ledger`) and the reporting functions of
`keras_dpscale.accounting`.
"""

import math

from keras_dpscale import accounting
from keras_dpscale import optimizers
from keras_dpscale import validators


class PrivacyReporting:
    """`epsilon`, `privacy_statement` and the budget of a model's ledger."""

    def privacy_ledger(self):
        """Every DP step of this model's weights, as `accounting.Segment`s."""
        return self._dp_ledger.segments()

    def privacy_settings(self, delta=None, accountant=None):
        """`(optimizer, delta, accountant, num_examples)` for reporting: the
        given values, else the DP optimizer's (None if there is none)."""
        optimizer = getattr(self, "optimizer", None)
        if not optimizers.is_private(optimizer):
            optimizer = None
        delta = (
            delta
            if delta is not None
            else getattr(optimizer, "target_delta", None)
        )
        if delta is None:
            raise ValueError(
                "Reporting epsilon needs delta: pass delta=..., or "
                "target_delta=... to the DP optimizer."
            )
        accountant = accountant or getattr(optimizer, "accountant", "pld")
        num_examples = getattr(optimizer, "num_examples", None)
        return optimizer, delta, accountant, num_examples

    def epsilon(self, delta=None, accountant=None):
        """Epsilon of every DP step recorded, at `delta` (default: the
        optimizer's `target_delta`)."""
        _, delta, accountant, num_examples = self.privacy_settings(
            delta, accountant
        )
        return accounting.ledger_epsilon(
            self.privacy_ledger(), num_examples, delta, accountant
        )

    def privacy_statement(self, delta=None):
        """What the guarantee is, what it assumes and what it does not cover."""
        optimizer, delta, accountant, num_examples = self.privacy_settings(
            delta
        )
        return accounting.privacy_statement(
            self.privacy_ledger(),
            delta,
            accountant,
            num_examples=num_examples,
            l2_norm_clip=getattr(optimizer, "l2_norm_clip", None),
            non_private_steps=self.non_private_steps(),
            not_covered=self.not_covered(),
        )

    def non_private_steps(self):
        """Steps of a non-DP optimizer on the weights before DP training."""
        return int(self._dp_ledger.non_private_steps.numpy())

    def not_covered(self):
        """State set from data outside DP training (adapted statistics)."""
        found = getattr(self, "_not_covered", None)
        return list(
            found
            if found is not None
            else validators.data_dependent_state(self)
        )

    def coming_steps(self):
        """A `Segment` with the settings of the coming steps (the optimizer's
        and the current data's sampling), or None if not known yet."""
        return self.optimizer.coming_steps(self._dp_ledger.sampling())

    def remaining_steps(self, epsilon_budget=None, delta=None):
        """Logical steps like the coming ones left within the budget; None
        if the coming steps' settings are not known yet."""
        optimizer, delta, accountant, num_examples = self.privacy_settings(
            delta
        )
        budget = (
            optimizer.epsilon_budget
            if epsilon_budget is None
            else epsilon_budget
        )
        if budget is None or not 0 < budget < math.inf:
            raise ValueError(
                f"A budget check needs a finite epsilon_budget > 0, got {budget}."
            )
        coming = self.coming_steps()
        if coming is None:
            return None
        return accounting.remaining_steps(
            self.privacy_ledger(),
            coming,
            num_examples,
            delta,
            budget,
            accountant,
        )
