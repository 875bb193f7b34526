"""Exceptions with messages that name the offending file, row or layer."""


class AgejaxError(Exception):
  """Base class for errors agejax reports to users."""


class DatasetError(AgejaxError):
  """A dataset file, row or image is malformed (message names it and says why)."""


class CheckpointError(AgejaxError):
  """A checkpoint does not match the architecture (message names the layer and shapes)."""


class ConfigError(AgejaxError):
  """A config field is missing or invalid (message names the field to set)."""


class TrainingError(AgejaxError):
  """Training diverged (message names the size, trial and step)."""
