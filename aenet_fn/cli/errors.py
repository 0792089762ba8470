"""The errors of the ``aenet-fn`` commands: :class:`CLIError` (wrong input, exit status 1)
and :class:`ConfigError` (a usage or configuration error, exit status 2); :func:`aenet_fn.cli.main`
prints their message without a traceback."""

from __future__ import annotations


class CLIError(Exception):
    """A problem with the input, reported without a traceback (exit status 1)."""

    status = 1


class ConfigError(CLIError):
    """A problem with the configuration or the command line (exit status 2)."""

    status = 2
