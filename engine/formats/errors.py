"""The one error type every model reader raises: it names the file, the tensor and what was expected."""

from __future__ import annotations

from pathlib import Path


class ModelFormatError(ValueError):
    """A model file is malformed, truncated or unsupported."""

    def __init__(self, path: str | Path, message: str, tensor: str | None = None) -> None:
        self.path = str(path)
        self.tensor = tensor
        where = f"{self.path}" + (f", tensor '{tensor}'" if tensor else "")
        super().__init__(f"{where}: {message}")
