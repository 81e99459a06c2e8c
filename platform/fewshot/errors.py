"""Errors a user can cause.

Each is one line that names the bad value and says what to do; the CLI prints it
and exits non-zero without a traceback.
"""


class FewShotError(Exception):
    """Base class: the message is shown to the user as it is."""


class ConfigError(FewShotError):
    """A config key or value is wrong (the message starts with its dotted path)."""


class DataError(FewShotError):
    """A dataset source or store is missing, corrupt or too small."""


class CheckpointError(FewShotError):
    """A checkpoint or run cannot be found or does not match the config."""


class RegistryError(FewShotError):
    """A registered model, version, alias or run cannot be found, registered or promoted."""


class RequestError(FewShotError):
    """A prediction request (images, labels, folders) is malformed."""


class ServeError(FewShotError):
    """The scoring server cannot be started or reached."""


class Interrupted(FewShotError):
    """A long job stopped before its end; the message says how to continue it."""
