"""User-facing errors: each message names the problem and the fix."""


class QALoRAError(ValueError):
    """Base class for errors caused by user input (model, data, settings)."""


class ConfigError(QALoRAError):
    """A setting is out of range or inconsistent with the model."""


class ModelError(QALoRAError):
    """The base model cannot be found or is not a LLaMA-family causal LM."""


class DataError(QALoRAError):
    """A dataset file or record is malformed; the message names file and row."""
