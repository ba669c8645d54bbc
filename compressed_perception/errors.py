"""Typed errors: every failure names the input it concerns and what is wrong with it."""

from __future__ import annotations

from collections.abc import Sequence


class PerceptionError(Exception):
    """Base class; the CLI turns these into one line on stderr and a non-zero exit."""


class ModelError(PerceptionError):
    """A model file, manifest or weight source is missing, unreadable or inconsistent."""


class IntegrityError(ModelError):
    """A file's sha256 differs from the one recorded for it (truncated or tampered)."""


class ImageError(PerceptionError):
    """An image is empty, of the wrong layout or depth, or not an image at all."""


class VideoError(PerceptionError):
    """A video cannot be opened or read."""


class BackendError(PerceptionError):
    """An inference backend is unknown, unavailable here, or failed to load a model."""


class ConfigError(PerceptionError):
    """A setting or argument is out of range or unknown."""


def check_choice(setting: str, value: object, choices: Sequence[object]) -> None:
    """A ConfigError naming `setting` and the choices, unless `value` is one of them."""
    if value not in choices:
        listed = ", ".join(str(choice) for choice in choices)
        raise ConfigError(f"{setting}: {value!r} is not one of {listed}")
