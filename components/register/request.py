"""What a serving request carries, shared by both served models (``serving.py``, the note
encoder, and ``related.py``, related notes): the image policy (least privilege, size caps; see
``serving.py``) and the conversion of a request's rows into :class:`model.NoteInput`.

Imported by the pyfunc files from the model's own ``code/`` folder when served: keep it free of
anything the pipeline's steps need but serving does not (KFP, DeepSpeed, Great Expectations).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

PREFIXES_ENV = "NOTELLM2_SERVING_IMAGE_PREFIXES"
MAX_BYTES_ENV = "NOTELLM2_SERVING_MAX_IMAGE_BYTES"
MAX_PIXELS_ENV = "NOTELLM2_SERVING_MAX_IMAGE_PIXELS"
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000


class ImageRefused(MlflowException):
    """A request's image is not accepted (a URI outside the allowed prefixes, too many bytes or
    pixels, not an image)."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass(frozen=True)
class ImagePolicy:
    prefixes: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_env(cls, env=None) -> ImagePolicy:
        env = os.environ if env is None else env

        def number(key: str, default: int) -> int:
            raw = (env.get(key) or "").strip()
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"${key} must be a whole number, not {raw!r}") from None
            if value < 1:
                raise ValueError(f"${key} must be at least 1, not {value}")
            return value

        prefixes = tuple(p.strip() for p in (env.get(PREFIXES_ENV) or "").split(",")
                         if p.strip())
        for p in prefixes:
            if "://" in p and not p.startswith("gs://"):
                raise ValueError(f"${PREFIXES_ENV}: {p!r} is neither a gs:// prefix nor a "
                                 "local folder")
            if p.startswith("gs://") and len(p.rstrip("/")) <= len("gs://"):
                raise ValueError(f"${PREFIXES_ENV}: {p!r} names no bucket")
        return cls(prefixes, number(MAX_BYTES_ENV, DEFAULT_MAX_BYTES),
                   number(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS))

    # -- URIs -----------------------------------------------------------------------------------

    def check_uri(self, uri: str) -> str:
        """``uri`` when it lies under an allowed prefix (local paths resolved), else
        :class:`ImageRefused`."""
        if not self.prefixes:
            raise ImageRefused(
                f"image_uri {uri!r} refused: this server reads no image URIs (set "
                f"${PREFIXES_ENV} to the gs:// or local prefixes it may read); send the image's "
                "bytes in the 'image' column instead (base64 in a JSON request)")
        if uri.startswith("gs://"):
            parts = uri[len("gs://"):].split("/")
            if any(p in (".", "..") for p in parts) or "" in parts[:-1]:
                raise ImageRefused(f"image_uri {uri!r} refused: not a plain gs:// object name")
            if any(uri.startswith(_dir(p)) for p in self.prefixes if p.startswith("gs://")):
                return uri
        elif "://" not in uri:
            real = os.path.realpath(uri)
            for p in self.prefixes:
                if p.startswith("gs://"):
                    continue
                root = os.path.realpath(p)
                if os.path.commonpath([real, root]) == root and real != root:
                    return real
        raise ImageRefused(f"image_uri {uri!r} refused: not under an allowed prefix "
                           f"(${PREFIXES_ENV}); send the image's bytes in the 'image' column")

    def read_uri(self, uri: str) -> bytes:
        from components.common import storage

        uri = self.check_uri(uri)
        if storage.is_gcs(uri):
            blob = storage._bucket_blob(uri)
            blob.reload()  # the size before the download
            size = blob.size or 0
        else:
            try:
                size = os.path.getsize(uri)
            except OSError as e:
                raise ImageRefused(f"image_uri {uri!r}: cannot read it ({e.strerror})") from None
        self._check_size(size, f"image_uri {uri!r}")
        data = storage.read_bytes(uri)
        self._check_size(len(data), f"image_uri {uri!r}")
        return data

    # -- bytes ----------------------------------------------------------------------------------

    def _check_size(self, n: int, what: str) -> None:
        if n > self.max_bytes:
            raise ImageRefused(f"{what}: {n} bytes, more than the {self.max_bytes} this server "
                               f"takes (${MAX_BYTES_ENV})")

    def decode(self, raw: bytes, what: str = "image"):
        """An RGB PIL image of ``raw``, after the byte and pixel caps."""
        from PIL import Image

        self._check_size(len(raw), what)
        try:
            with Image.open(io.BytesIO(raw)) as im:  # reads the header only
                w, h = im.size
                if w * h > self.max_pixels:
                    raise ImageRefused(f"{what}: {w}x{h} = {w * h} pixels, more than the "
                                       f"{self.max_pixels} this server takes (${MAX_PIXELS_ENV})")
                im.load()
                return im.convert("RGB")
        except ImageRefused:
            raise
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            raise ImageRefused(f"{what}: not a readable image ({e})") from None

    def image(self, row: dict):
        """The note's image: the ``image`` bytes if given, else an allowed ``image_uri``, else
        none."""
        raw = row.get("image")
        if isinstance(raw, (bytes, bytearray, memoryview)) and len(raw):
            return self.decode(bytes(raw))
        if isinstance(raw, str) and raw:
            raise ImageRefused("'image' must be the image's bytes (base64 in a JSON request "
                               "with the model's signature), not text")
        uri = row.get("image_uri")
        if isinstance(uri, str) and uri:
            return self.decode(self.read_uri(uri), f"image_uri {uri!r}")
        return None


def _dir(prefix: str) -> str:
    return prefix if prefix.endswith("/") else prefix + "/"


def _topics(v) -> tuple[str, ...]:
    if v is None or (isinstance(v, float) and v != v):
        return ()
    if isinstance(v, str):
        return tuple(t.strip() for t in v.split(",") if t.strip())
    return tuple(str(t) for t in v)


def note_inputs(rows: list[dict], policy: ImagePolicy | None = None) -> list:
    """The :class:`model.NoteInput` of each request row (``title``, ``content``, ``topics``,
    ``image`` bytes or an allowed ``image_uri``)."""
    from model import NoteInput

    policy = ImagePolicy.from_env() if policy is None else policy
    return [NoteInput(str(r.get("title") or ""), str(r.get("content") or ""),
                      _topics(r.get("topics")), policy.image(r)) for r in rows]
