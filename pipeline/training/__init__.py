"""Training into a bundle (DESIGN.md "pipeline/training/: one framework for every method"):
``classifier`` writes a new bundle, ``explainers`` adds a trained explainer to one,
``domain_guard`` fits and calibrates the bundle's domain guard.
The first two drive ``explainers.training.fit``; the data comes from ``pipeline.training.datasets``."""
