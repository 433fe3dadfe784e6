"""Exceptions shared by every step of the data flow.

The command line maps :class:`InputError` to exit code 2 (bad input or usage) with its
message and no traceback; anything else is a failure of the program (exit code 1).
:class:`Failures` collects the failures of single participants so that the others go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

_log = logging.getLogger(__name__)

#: Logging level of ``-v``: the DCM's per-iteration lines and tracebacks (between DEBUG and INFO).
LOG_VERBOSE = 15


class InputError(Exception):
    """Bad input or usage: a file, folder, option or value the user must fix.

    The message must name the file or option at fault and say what is wrong.
    """


class ParticipantsFailed(Exception):
    """Some participants failed for a failure of the program (exit code 1), others may be done.

    The message is the summary of every failure (see :class:`Failures`); the command line
    shows it without a traceback (each traceback was logged with ``-v`` as it happened).
    """


@dataclass(frozen=True)
class Failure:
    """Why one participant (or one of its runs) failed.

    Attributes
    ----------
    subject
        Participant label, without ``sub-``.
    where
        The run and network, or step, that failed (empty for the participant as a whole).
    reason
        The message (for a failure of the program, prefixed by the exception's type).
    bad_input
        True for bad input (:class:`InputError`), False for a failure of the program.
    """

    subject: str
    where: str
    reason: str
    bad_input: bool


class Failures:
    """Participants that failed, and why: the others go on; one summary at the end.

    A participant recorded here is left out of the steps that follow (its runs' outputs
    are never written); the end of the participant level raises :meth:`error`.
    """

    def __init__(self) -> None:
        self.items: list[Failure] = []

    def record(self, subject: str, err: Exception, where: str = "") -> None:
        """Record ``err`` for ``subject``; log one line (the traceback only with ``-v``).

        Parameters
        ----------
        subject
            Participant label, without ``sub-``.
        err
            The exception (an :class:`InputError` is bad input, anything else a failure
            of the program). It must be the one being handled, for the traceback.
        where
            The run and network, or step, that failed.
        """
        bad_input = isinstance(err, InputError)
        reason = str(err) if bad_input else f"internal error: {type(err).__name__}: {err}"
        self.items.append(Failure(subject, where, reason, bad_input))
        place = f"sub-{subject}" + (f" {where}" if where else "")
        _log.error("%s failed, left out (the others go on): %s", place, reason)
        if not bad_input and err.__traceback__ is not None:
            _log.log(LOG_VERBOSE, "traceback of the failure of %s", place, exc_info=err)

    def __contains__(self, subject: object) -> bool:
        return any(f.subject == subject for f in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    @property
    def subjects(self) -> set[str]:
        """The participants with at least one failure."""
        return {f.subject for f in self.items}

    def error(self, n_processed: int) -> InputError | ParticipantsFailed:
        """The exception that ends the run: exit code 2 when every failure is bad input, else 1.

        Parameters
        ----------
        n_processed
            Participants processed without failure, for the summary.

        Returns
        -------
        InputError or ParticipantsFailed
            Its message lists every failed participant and run with the reason.
        """
        lines = [f"sub-{f.subject}{' ' + f.where if f.where else ''}: {f.reason}"
                 for f in sorted(self.items, key=lambda f: (f.subject, f.where))]
        text = (f"{len(self.subjects)} participant(s) failed ({n_processed} processed):\n" + "\n".join(lines))
        if all(f.bad_input for f in self.items):
            return InputError(text)
        return ParticipantsFailed(text)
