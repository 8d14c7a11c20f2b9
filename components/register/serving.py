"""The registered model: an MLflow pyfunc logged from code (no pickles).

Input: a DataFrame of notes with ``title``, ``content``, optional ``topics`` (list or
comma-separated string) and an optional image, preferably as ``image`` (the encoded file's
bytes; base64 in a JSON request, as MLflow's scoring server expects for a binary column, and
``""`` for a note without one: MLflow cannot decode a null there).
Output: (N, d) float32 unit vectors, the same the embed step writes.

Least privilege. The server reads images with its own credentials (its service account, its
file system), so a request may not name just any file or object: an ``image_uri`` (local path
or ``gs://``) is read only when it lies under one of the prefixes listed, comma-separated, in
``$NOTELLM2_SERVING_IMAGE_PREFIXES`` (e.g. ``gs://notes-bucket/images/``); unset or empty, every
``image_uri`` is refused, with an error that says to send the bytes. Local paths are compared
after resolving ``..`` and symbolic links; other schemes (``http://``, ``file://``) are refused.
Received or read bytes are capped too: at most ``$NOTELLM2_SERVING_MAX_IMAGE_BYTES`` bytes
(default 16 MiB) and ``$NOTELLM2_SERVING_MAX_IMAGE_PIXELS`` pixels (default 40 M, width x
height as the file's header claims it, checked before anything is decoded: a decompression
bomb is refused without being expanded). A refused image fails the request with
``INVALID_PARAMETER_VALUE`` (HTTP 400 from ``mlflow models serve``).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

# the image policy lives in request.py (shared with related.py); kept importable from here
from components.register.request import (  # noqa: F401
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    MAX_BYTES_ENV,
    MAX_PIXELS_ENV,
    PREFIXES_ENV,
    ImagePolicy,
    ImageRefused,
    note_inputs,
)


class NoteEncoder(PythonModel):
    def load_context(self, context) -> None:
        from model import NoteLLM2

        self.model = NoteLLM2.from_pretrained(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        from model import encode

        notes = note_inputs(model_input.to_dict(orient="records"))
        return encode(self.model, notes, progress=False)


mlflow.models.set_model(NoteEncoder())
