"""The registered model: an MLflow pyfunc logged from code (no pickles).

Input: a DataFrame of notes with ``title``, ``content``, optional ``topics`` (list or
comma-separated string) and an image as ``image_uri`` (local path or gs://) or ``image`` (bytes).
Output: (N, d) float32 unit vectors, the same the embed step writes.
"""

from __future__ import annotations

import io

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class NoteEncoder(PythonModel):
    def load_context(self, context) -> None:
        from model import NoteLLM2

        self.model = NoteLLM2.from_pretrained(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        from PIL import Image

        from components.common.notes import load_image
        from model import NoteInput, encode

        def topics(v):
            if v is None or (isinstance(v, float) and v != v):
                return ()
            if isinstance(v, str):
                return tuple(t.strip() for t in v.split(",") if t.strip())
            return tuple(str(t) for t in v)

        def image(row):
            raw = row.get("image")
            if isinstance(raw, (bytes, bytearray)) and raw:
                return Image.open(io.BytesIO(raw)).convert("RGB")
            uri = row.get("image_uri")
            return load_image(uri) if isinstance(uri, str) and uri else None

        notes = [NoteInput(str(r.get("title") or ""), str(r.get("content") or ""),
                           topics(r.get("topics")), image(r))
                 for r in model_input.to_dict(orient="records")]
        return encode(self.model, notes, progress=False)


mlflow.models.set_model(NoteEncoder())
