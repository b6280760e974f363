"""The package's domain errors: one base class, so a caller (the CLI) catches one type.

Each error is something the user can fix, and its message names what (the file, the setting, the
device). Each is also the built-in exception it refines (a bad setting is a ``ValueError``, a
missing input a ``FileNotFoundError``), so code that catches those keeps working.
"""

from __future__ import annotations


class ForensicVlmError(Exception):
    """A problem with the inputs, the settings or the machine, named in the message."""


class ConfigError(ForensicVlmError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent."""


class InputNotFoundError(ForensicVlmError, FileNotFoundError):
    """A folder or file the run needs does not exist (or a package that ships one is missing)."""


class OutputExistsError(ForensicVlmError, FileExistsError):
    """A folder the tool did not write is in the way; it is never deleted."""


class BadInputError(ForensicVlmError, RuntimeError):
    """Under ``manifest.on_bad_input: fail``, a file that cannot be used."""


class EvidenceChangedError(ForensicVlmError, RuntimeError):
    """A file's content no longer matches the sha256 recorded when it was first read."""


class PreflightError(ForensicVlmError, ValueError):
    """An image would expand to more tokens than ``model.max_sequence_tokens``."""


class DeviceError(ForensicVlmError, RuntimeError):
    """The settings ask for devices this machine does not have."""


class ScoringProcessError(ForensicVlmError, RuntimeError):
    """A scoring process on another device failed or ended early; the message carries why."""


class NonFiniteScoresError(ScoringProcessError):
    """A forward pass gave NaN or infinite class probabilities: no class can be read from them."""


class IntegrityError(ForensicVlmError, RuntimeError):
    """A model, adapter or cache file differs from its record, or a record is damaged."""


class ResumeError(ForensicVlmError, RuntimeError):
    """A checkpoint cannot be resumed exactly (it is not this run's); the message says what to do."""


class ContainerError(ForensicVlmError, ValueError):
    """An evidence container (E01, disk image, zip, tar) cannot be opened as asked: the message says why."""


class ContainerIntegrityError(IntegrityError):
    """An evidence container's media data does not match the hash stored in it, or cannot be read whole."""


class UnsupportedModelError(ForensicVlmError, ValueError):
    """A checkpoint's architecture is not one the pipeline supports; the message lists those it does."""


class ExportParityError(ForensicVlmError, RuntimeError):
    """A merged model gives an image another class than base + adapter; the message names the image."""


class DecisionFileError(ForensicVlmError, ValueError):
    """A line of an examiner's decisions file cannot be used; the message names the file and line."""


class ReviewGainError(ForensicVlmError, ValueError):
    """The models before and after the reviewed labels were not scored on the same test images."""
