"""How Service Bus SDK errors read in jobq's messages: one short redacted line, the
whole text when the details span lines, and whether an error means a refused
credential (which no retry fixes)."""

from __future__ import annotations

from azure.servicebus.exceptions import (
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
)

from ...redact import redact


def _short(exc: BaseException) -> str:
    lines = redact(str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def _auth_failure(exc: BaseException) -> BaseException | None:
    """The error that says a credential was refused, if ``exc`` is or wraps one.

    Through a ``custom_endpoint_address`` the SDK reports a refused CBS token as a
    retryable ``ServiceBusConnectionError`` (for uamqp parity) that carries the
    AMQP layer's ``TokenAuthFailure`` -- with the service's reason -- as
    ``inner_exception``."""
    if isinstance(exc, (ServiceBusAuthenticationError, ServiceBusAuthorizationError)):
        return exc
    inner = getattr(exc, "inner_exception", None)
    if isinstance(inner, BaseException) and any(
        cls.__name__ == "AuthenticationException" for cls in type(inner).__mro__
    ):
        return inner
    return None


def _reason(exc: BaseException) -> str:
    """All lines of a (redacted) error, for one whose details span several lines."""
    text = " ".join(line.strip() for line in redact(str(exc)).strip().splitlines())
    return f"{type(exc).__name__}: {text[:500]}"
