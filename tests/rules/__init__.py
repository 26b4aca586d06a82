"""Tests of the per-layer clipping rules (`keras_dpscale.rules`)."""
