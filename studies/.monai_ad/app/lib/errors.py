"""Failures as HTTP answers: a status code and one line a user can act on, never a bare 500."""

from __future__ import annotations

import logging

from fastapi import HTTPException
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

from monai_ad.errors import InputError

logger = logging.getLogger(__name__)


def _find(exc: BaseException, kind: type) -> BaseException | None:
    """``exc`` or the first exception of ``kind`` in its cause chain (MONAI wraps transform errors)."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def http_error(exc: BaseException, model: str | None = None) -> HTTPException:
    if isinstance(exc, HTTPException):
        return exc
    user_error = _find(exc, InputError)
    if user_error is not None:
        return HTTPException(422, str(user_error))
    label_error = _find(exc, MONAILabelException)
    if label_error is not None:
        code = 422 if label_error.error == MONAILabelError.INVALID_INPUT else 500
        return HTTPException(code, str(label_error.msg))
    if isinstance(exc, TimeoutError):
        return HTTPException(504, f"{model}: inference timed out")
    logger.exception("%s: inference failed", model)
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return HTTPException(500, f"{model}: inference failed ({type(exc).__name__}{': ' + reason[:300] if reason else ''})")
