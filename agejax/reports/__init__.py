"""Reporting: per-trial result CSVs and Markdown tables, learning-curve and diagnostic plots, TensorBoard logs."""
