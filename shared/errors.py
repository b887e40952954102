"""The exception hierarchy every side shares. Library errors are translated into these at the seams."""


class DetfleetError(Exception):
    """Base of every error detfleet raises on purpose; the CLI prints it as one line and exits
    ``exit_code``: 2 for what the caller gave (arguments, settings, input files), 1 for a runtime failure."""

    exit_code = 2


class SettingsError(DetfleetError):
    """A setting is invalid or unknown; the message names the variable."""


class TaskValidationError(DetfleetError):
    """A message does not satisfy the wire contract: bad input, dead-lettered with this text as its reason."""


class UnsupportedSchemaError(TaskValidationError):
    """The message speaks a newer schema than this process; ops replay it after the upgrade."""


class FrameRejectedError(TaskValidationError):
    """The frame body is not an accepted image (format, size or dimensions)."""


class FrameTooLargeError(FrameRejectedError):
    """The frame is over the contract's byte or pixel limit (HTTP 413 at the gateway)."""


class NotAnImageError(FrameRejectedError):
    """The body is neither a JPEG nor a PNG (HTTP 415 at the gateway)."""


class BrokerError(DetfleetError):
    """Anything that went wrong talking to RabbitMQ."""

    exit_code = 1


class BrokerUnavailableError(BrokerError):
    """The broker cannot be reached or the connection was lost."""


class UnroutableError(BrokerError):
    """The broker returned a mandatory publish: no queue is bound for its routing key."""


class PublishNackedError(BrokerError):
    """The broker refused a publish (basic.nack), e.g. a full queue with reject-publish."""


class PublishTimeoutError(BrokerError):
    """No confirm arrived in time, e.g. while the broker has blocked the connection (memory or disk alarm)."""


class FrameDroppedError(BrokerError):
    """A realtime frame was given up on purpose: pushed out of its full buffer, or past its deadline."""


class ManagementError(BrokerError):
    """The RabbitMQ management API answered with an error."""


class DatabaseError(DetfleetError):
    """Postgres could not be reached or refused a statement."""

    exit_code = 1


class BrokerRefusedError(BrokerError):
    """The broker answered but refused the login or the vhost: retrying cannot help."""


class DatabaseRefusedError(DatabaseError):
    """Postgres answered but refused the role, password or database: retrying cannot help."""
