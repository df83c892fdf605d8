"""Training into a bundle (DESIGN.md "pipeline/training/: one framework for every method"):
``classifier`` writes a new bundle, ``explainers`` adds a trained explainer to one.
Both drive ``explainers.training.fit``; the data comes from ``pipeline.datasets``."""
