"""The two ways a compile stops: the user's mistake (exit 2) or a failed build (exit 1)."""

from __future__ import annotations

from collections.abc import Iterable

from qspec.dsl.diagnostics import Diagnostic, Note
from qspec.dsl.ir import Span


class UserError(Exception):
    """A mistake in the spec, the model entry or the data, located in the spec where possible."""

    def __init__(
        self,
        message: str,
        span: Span | None = None,
        *,
        expected: str | None = None,
        help: str | None = None,
        notes: Iterable[Note] = (),
    ):
        super().__init__(message)
        where = span or Span("qspec", 0, 0, 0, 0)  # not about a spec line: "qspec: error"
        self.diagnostic = Diagnostic("error", message, where, expected, help, tuple(notes))


class InfeasibleBudget(UserError):
    """A budget no choice of candidates can meet (a sweep records it and goes on)."""


class CompileFailure(Exception):
    """The inputs were fine but the build did not succeed (or missed its fidelity threshold)."""
