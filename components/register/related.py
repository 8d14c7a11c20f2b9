"""Related notes, served: the product's item-to-item output as an MLflow pyfunc logged from code.

Logged by the register step as a second model, ``related``, in the pipeline's run, beside the
note encoder (``model``); the encoder's registered version carries its URI in the tag
``related_model_uri``. Its artifacts are the run's FAISS index folder (``index.faiss``,
``ids.parquet``, ``index.json``: the search parameters recorded there are applied) and the
encoder's weights (to embed notes the index does not hold).

Input: a DataFrame, one row per query note, every column optional:

* ``note_id`` of a note in the index: its vector is taken from the index (``reconstruct``; for a
  compressed index that is the decoded vector the index compares with) and the note itself is
  left out of its own results;
* otherwise the note's fields as the encoder takes them (``title``, ``content``, ``topics``,
  ``image`` bytes or an allowed ``image_uri``, under the same image policy, see ``serving.py``):
  the note is embedded with the run's model and searched. A ``note_id`` the index does not hold,
  on a row without any field, fails the request with a 400 naming it.

Parameter ``k`` (default 10, at most 1,000): how many related notes per query.
Output: one row per query: ``note_id`` (as sent, ``""`` for a new note), ``related_ids`` (the top
``k`` note ids, best first) and ``scores`` (their inner products, the cosine of unit vectors).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

DEFAULT_K = 10
MAX_K = 1000
FIELDS = ("title", "content", "topics", "image", "image_uri")


def _given(v) -> bool:
    if v is None or (isinstance(v, float) and v != v):
        return False
    return len(v) > 0 if hasattr(v, "__len__") else True


class RelatedNotes(PythonModel):
    def load_context(self, context) -> None:
        import faiss

        from components.index.run import load_index
        from model import NoteLLM2

        self.index, ids, self.meta = load_index(context.artifacts["index"])
        self.ids = [str(i) for i in ids]
        self.position = {n: i for i, n in enumerate(self.ids)}
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:  # an IVF index reconstructs a stored vector only with a direct map
            ivf.make_direct_map()
        self.model = NoteLLM2.from_pretrained(context.artifacts["model"])

    def _k(self, params) -> int:
        raw = (params or {}).get("k", DEFAULT_K)
        try:
            k = int(raw)
        except (TypeError, ValueError):
            k = 0
        if not 1 <= k <= MAX_K:
            raise MlflowException(f"k must be a whole number from 1 to {MAX_K}, not {raw!r}",
                                  error_code=INVALID_PARAMETER_VALUE)
        return k

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from components.index.run import search
        from components.register.request import note_inputs
        from model import encode

        k = self._k(params)
        rows = model_input.to_dict(orient="records")
        queries = np.zeros((len(rows), self.index.d), dtype=np.float32)  # (q, d)
        own = np.full(len(rows), -1, dtype=np.int64)  # (q,) a query's own index position
        new = []
        for i, r in enumerate(rows):
            nid = r.get("note_id")
            nid = str(nid) if _given(nid) else ""
            if nid in self.position:
                own[i] = self.position[nid]
                queries[i] = self.index.reconstruct(int(own[i]))
            elif nid and not any(_given(r.get(f)) for f in FIELDS):
                raise MlflowException(
                    f"note_id {nid!r} is not in this run's index and the row has no note "
                    f"fields ({', '.join(FIELDS)}) to embed it from",
                    error_code=INVALID_PARAMETER_VALUE)
            else:
                new.append(i)
        if new:
            queries[new] = encode(self.model, note_inputs([rows[i] for i in new]),
                                  progress=False)
        scores, found = search(self.index, queries, min(k + 1, self.index.ntotal))
        related, related_scores = [], []
        for i in range(len(rows)):
            keep = (found[i] >= 0) & (found[i] != own[i])
            related.append([self.ids[p] for p in found[i][keep][:k]])
            related_scores.append([float(s) for s in scores[i][keep][:k]])
        return pd.DataFrame({
            "note_id": [str(r.get("note_id")) if _given(r.get("note_id")) else "" for r in rows],
            "related_ids": related, "scores": related_scores})


mlflow.models.set_model(RelatedNotes())
