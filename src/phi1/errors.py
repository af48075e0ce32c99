"""Errors a user can act on: a config key out of range, an input file that is missing or malformed, an API that
refuses. Their messages name the key, file or line and say what to do, so a traceback adds nothing.

They derive from Hydra's CompactHydraException: `train.py`, `prepare.py`, `evaluate.py` and `report.py` run
under `hydra.main`, whose error report prints such an exception's message alone and exits with status 1
(HYDRA_FULL_ERROR=1 shows the traceback); `python -m phi1.export` prints them the same way. Each also derives
from the builtin error it stands for, so that callers catching ValueError or FileNotFoundError still catch it.
Bugs keep their tracebacks.
"""

import logging
from contextlib import contextmanager

from hydra.errors import CompactHydraException
from omegaconf.errors import InterpolationResolutionError


class Phi1Error(CompactHydraException):
    """An error whose message tells the user what to fix."""


class InputError(Phi1Error, ValueError):
    """A config value or an input file's content is wrong."""


class MissingInputError(Phi1Error, FileNotFoundError):
    """A file, run or checkpoint that the command needs does not exist (yet)."""


# The line a command's log file gets when it stops on an error; report.py finds it in a stopped run's log.
STOPPED = "stopped: "


def to_log_files(level: int, message: str, exc_info=None) -> None:
    """A record for the log files alone (the root logger's file handlers: train.log, evaluate.log), not the
    terminal, for what the terminal already gets another way (Hydra's report of an error, a SystemExit's
    message): a run folder's log ended at its last progress line, and a cluster job's reason lay in a scheduler
    file elsewhere."""
    record = logging.LogRecord("phi1", level, __file__, 0, "%s", (message,), exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _to_log_files(e: Exception) -> None:
    """The error that stops a command, and its traceback where it is a bug."""
    to_log_files(logging.ERROR, f"{STOPPED}{e}", None if isinstance(e, Phi1Error) else (type(e), e, e.__traceback__))


@contextmanager
def unwrapped():
    """An error raised while OmegaConf resolves an interpolation (a resolver's, such as `${phi1.tau:${tau}}`
    without tau) reaches Hydra wrapped in OmegaConf's own, and Hydra prints that with a traceback: the entry
    points re-raise ours bare. Every error is also written to the command's log file."""
    try:
        yield
    except InterpolationResolutionError as e:
        cause = e.__cause__ or e.__context__
        while isinstance(cause, InterpolationResolutionError):  # OmegaConf wraps once per level of nesting
            cause = cause.__cause__ or cause.__context__
        _to_log_files(cause if isinstance(cause, Phi1Error) else e)
        if isinstance(cause, Phi1Error):
            raise cause.with_traceback(None) from None
        raise
    except Exception as e:
        _to_log_files(e)
        raise
