"""Errors that the CLI reports as one line each, without a traceback."""

from __future__ import annotations


MAX_ECHO = 300  # characters of a user's input an error message repeats at most


class DROError(Exception):
    """Base class for problems a user can fix: bad config, bad data, a model that cannot be loaded."""


class ConfigError(DROError):
    """The run config is invalid. ``problems`` holds one line per problem, all found at once."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        # a message never echoes much of the input (a huge value or an alias bomb would flood the terminal)
        self.problems = [p if len(p) <= MAX_ECHO else p[:MAX_ECHO] + "..." for p in problems]
        problems = self.problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


class DataError(DROError):
    """A data file is missing or malformed; the message names the file and line."""


class ModelLoadError(DROError):
    """A selector or generator model cannot be loaded (unknown id, offline, unsafe weights)."""


class TrainingError(DROError):
    """Training cannot go on, for example because losses stay NaN."""


class PipelineError(DROError):
    """A framework pipeline cannot be trained: it does not load, or a retriever, prompt or generator is missing."""


class Interrupted(DROError):
    """Training stopped on request (Ctrl-C), after saving a checkpoint where one was due; running again resumes."""
