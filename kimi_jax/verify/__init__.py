"""Verify and compare run bundles without JAX or the model (``--replay`` aside)."""
