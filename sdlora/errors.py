"""The one exception type that reaches the user as a one-line message and exit code 2 (and its kinds), and what a
model loader raises on a damaged or foreign model (`LOAD_ERRORS`, turned into one)."""

# What from_pretrained raises on a damaged or foreign folder (a truncated safetensors file is a SafetensorError).
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, RuntimeError, AttributeError)
try:
    from safetensors import SafetensorError

    LOAD_ERRORS += (SafetensorError,)
except ImportError:  # older safetensors: its error is a subclass of the above
    pass


class UserError(Exception):
    """Bad input from the user (config, data, model path). The CLI prints `error: <message>` and exits 2."""

    exit_code = 2


class WriteError(UserError, OSError):
    """A file on a path the user gave could not be written (full disk, read-only folder): one line naming the path,
    exit 2. Still an OSError carrying the errno, so callers that recover from a failed write (checkpoints) see it."""

    def __init__(self, path, cause: OSError):
        import errno

        reason = "the disk is full" if cause.errno == errno.ENOSPC else (cause.strerror or str(cause))
        OSError.__init__(self, cause.errno, reason, str(path))
        self.message = f"could not write {path}: {reason}"

    def __str__(self) -> str:
        return self.message


class NonFiniteWeights(UserError):
    """An optimiser update made trained tensors non-finite, or a write was asked to store non-finite values."""

    exit_code = 3
