"""Dataset readers, cleaning, duplicates, label distributions, the image cache and input pipelines."""

from agejax.data.records import AgeRecord, Dataset, Rejections

__all__ = ["AgeRecord", "Dataset", "Rejections"]
