"""Storage errors, and which failures are worth retrying: a refusal (no such bucket, access
denied) is bad input; a timeout, a reset or a 503 is transient; the rest fails at once."""

from __future__ import annotations

import errno
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

# Not worth retrying: the answer will not change.
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
              NotADirectoryError, ValueError, TypeError, KeyError, NotImplementedError)
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ReadTimeoutError", "ConnectTimeoutError", "ConnectionClosedError",
    "ClientOSError", "ServerDisconnectedError", "ClientPayloadError", "IncompleteReadError",
    "ResponseStreamingError", "ClientConnectorError", "ServerTimeoutError", "ProxyConnectionError",
    "HTTPClientError", "ClientConnectionError", "TimeoutError",
}
# Matched against messages of errors without a structured HTTP status (aiohttp, sockets).
_TRANSIENT_TEXT = re.compile(
    r"\b(500|502|503|504)\b|SlowDown|ServiceUnavailable|InternalError|RequestTimeout|Throttl|"
    r"reset by peer|Connection reset|timed out|Server disconnected|Broken pipe|TooManyRequests")
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                    "Throttling", "ThrottlingException", "RequestLimitExceeded",
                    "TooManyRequestsException", "RequestThrottled", "TooManyRequests"}
_TRANSIENT_ERRNO = {errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE, errno.ECONNABORTED,
                    errno.ECONNREFUSED, errno.EAGAIN}


class StorageError(Exception):
    """A storage call failed for good (permanent error, or retries exhausted)."""


class StorageAccessError(StorageError):
    """Storage refuses this configuration: the bucket does not exist, or the credentials may
    not use it. Bad input (fix the URL or the credentials), not an outage; never retried."""

    def __init__(self, message: str, root: str = "") -> None:
        super().__init__(message)
        self.root = root  # the root URI of the Storage that was refused


@dataclass
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 5.0
    deadline: float = 90.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """``FTT_STORAGE_RETRY_ATTEMPTS`` / ``_DEADLINE`` tune it (tests shorten it)."""
        p = cls()
        p.attempts = int(os.environ.get("FTT_STORAGE_RETRY_ATTEMPTS", p.attempts))
        p.deadline = float(os.environ.get("FTT_STORAGE_RETRY_DEADLINE", p.deadline))
        p.base_delay = float(os.environ.get("FTT_STORAGE_RETRY_BASE_DELAY", p.base_delay))
        return p

    def delay(self, attempt: int, elapsed: float) -> float:
        """The wait before retry ``attempt``: exponential, capped, with jitter (replicas do
        not retry in step), and never past the deadline."""
        delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return min(random.uniform(delay / 2, delay), max(0.0, self.deadline - elapsed))


def is_transient(exc: BaseException) -> bool:
    """Whether an error from fsspec/s3fs/botocore/aiohttp looks like a transient failure.

    An S3 answer is judged by its HTTP status and error code (5xx, 408, 429, SlowDown and the
    throttling codes are transient; 4xx are not); errors without an answer (resets, timeouts,
    refused connections) by their type, errno or message. The cause chain is followed, since
    s3fs wraps botocore's ClientError into an OSError.
    """
    for e in _chain(exc):
        if isinstance(e, _PERMANENT):
            return False
        answer = _s3_answer(e)
        if answer is not None:
            status, code = answer
            return (status is not None and (status >= 500 or status in (408, 429))) or \
                code in _TRANSIENT_CODES
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if type(e).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
            return True
        if _TRANSIENT_TEXT.search(str(e)):
            return True
    return False


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes (s3fs wraps botocore's ClientError into an OSError)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


# botocore's errors when it has no usable credentials to sign with: bad input, never retried.
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "ProfileNotFound"}

# S3 answers that mean "this bucket or these credentials will never work": bad input.
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                 "InvalidToken", "AllAccessDisabled", "AccountProblem", "InvalidSecurity"}


def _refusal_answer(e: BaseException) -> tuple[int | None, str] | None:
    """(HTTP status, code) of an S3 answer in ``e``'s cause chain that refuses the bucket
    (NoSuchBucket) or the credentials (403, the denial codes); None otherwise."""
    for cur in _chain(e):
        answer = _s3_answer(cur)
        if answer is not None:
            status, code = answer
            if code == "NoSuchBucket" or status == 403 or code in _DENIED_CODES:
                return answer
            return None
    return None


def _errno_in_chain(e: BaseException) -> int | None:
    """The errno of the first OSError in ``e``'s cause chain that has one."""
    return next((cur.errno for cur in _chain(e) if isinstance(cur, OSError) and cur.errno), None)


def _s3_answer(e: BaseException) -> tuple[int | None, str] | None:
    """(HTTP status, error code) of a botocore ClientError; None for other errors."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return (int(status) if status else None), str((response.get("Error") or {}).get("Code", ""))


def redact(text: str) -> str:
    """Drop anything that looks like a credential from an error message."""
    text = re.sub(r"(?i)(secret|token|password|key)([\"']?\s*[:=]\s*)[^\s,}&]+", r"\1\2***", text)
    return re.sub(r"(?i)(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token)=[^&\s]+",
                  r"\1=***", text)


def s3_refusal(what: str, e: BaseException, bucket: str, root_uri: str
               ) -> StorageAccessError | None:
    """A StorageAccessError when S3 refuses this configuration for good (``e`` from ``what``
    on ``root_uri``): the bucket does not exist, or the credentials may not use it (403). None
    for any other error."""
    missing = next((type(c).__name__ for c in _chain(e)
                    if type(c).__name__ in _NO_CREDENTIALS), None)
    if missing is not None:  # botocore found none: no request was even sent
        return StorageAccessError(
            f"no S3 credentials found for {what} ({missing}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or key and secret in the storage "
            'options; {"anon": true} for a public bucket)', root_uri)
    answer = _refusal_answer(e)
    if answer is None:
        return None
    status, code = answer
    if code == "NoSuchBucket":
        return StorageAccessError(f"the bucket {bucket!r} does not exist (S3 NoSuchBucket): "
                                  "create it, or fix the bucket name", root_uri)
    shown = f"S3 {code}, HTTP {status}" if code and not code.isdigit() else f"HTTP {status}"
    return StorageAccessError(
        f"access to the bucket {bucket!r} was denied ({shown}) for {what}: check the "
        "credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or key and "
        f"secret in the storage options) and that they may read and write {root_uri}",
        root_uri)
