"""What the registered pyfuncs carry so that ``mlflow models serve`` can run them without this
repository or its package: the product's inference code (``code_paths``), real pip requirements
pinned to the versions installed here, an input example, and a serving-input check run before
anything is registered.

``code_paths`` with models from code (MLflow 3.17): the folders listed are copied into the
model's ``code/`` folder, and loading the model (``mlflow.pyfunc.load_model``, the scoring server)
puts that folder first on ``sys.path`` before it executes the model file (``serving.py``,
``related.py``), so their ``import model`` / ``import components...`` resolve to the copies
shipped with the model, not to whatever the serving environment has installed.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the product's files the served models import (model/ is needed whole: network, encode, ...)
INFERENCE_CODE = (
    "model",
    "components/__init__.py",
    "components/common",
    "components/embed/__init__.py", "components/embed/run.py",  # read_vectors, for index/run
    "components/index/__init__.py", "components/index/run.py",  # load_index, search
    "components/register/__init__.py", "components/register/request.py",
)

# distributions imported at inference; pinned to what is installed (local tags like +cpu
# dropped: no public index serves them)
ENCODER_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors",
                        "pillow", "numpy", "pandas", "pyarrow", "tqdm", "google-cloud-storage")
RELATED_REQUIREMENTS = (*ENCODER_REQUIREMENTS, "faiss-cpu")


def stage_code(dest: str) -> list[str]:
    """Copy :data:`INFERENCE_CODE` under ``dest`` (the same layout as the repository) and
    return the top-level folders to pass as ``code_paths``."""
    for rel in INFERENCE_CODE:
        src, dst = os.path.join(REPO, rel), os.path.join(dest, rel)
        if os.path.isdir(src):
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                            dirs_exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)
    return sorted({os.path.join(dest, rel.split("/")[0]) for rel in INFERENCE_CODE})


def pinned(distributions) -> list[str]:
    out = []
    for name in distributions:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            raise RuntimeError(f"{name} is needed at inference but not installed here") from None
    return out


def _example_image() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def encoder_example():
    """One note with an image (the bytes), one without."""
    import pandas as pd

    return pd.DataFrame({"title": ["Pumpkin doll", "Weekend hike"],
                         "content": ["perfect for Halloween", "three lakes in one day"],
                         "topics": ["toys,halloween", ""], "image": [_example_image(), b""]})


def related_example(note_id: str):
    """A note of the index by its id, and a new note by its fields."""
    import pandas as pd

    return pd.DataFrame({"note_id": [note_id, ""], "title": ["", "Weekend hike"],
                         "content": ["", "three lakes in one day"], "topics": ["", "outdoors"],
                         "image": [b"", _example_image()]})


def serving_input(example, params: dict | None = None) -> str:
    """The JSON body ``mlflow models serve`` takes for ``example`` (binary columns base64)."""
    import json

    from mlflow.models import convert_input_example_to_serving_input

    body = json.loads(convert_input_example_to_serving_input(example))
    if params:
        body["params"] = params
    return json.dumps(body)


@contextmanager
def isolated_load():
    """Leaves ``sys.path`` and the product's modules as they were: loading a model with code
    paths (``log_model`` does, to check its input example) puts the model's ``code/`` folder, a
    temporary copy, first on ``sys.path`` for good."""
    path, before = list(sys.path), set(sys.modules)
    try:
        yield
    finally:
        sys.path[:] = path
        for name in [n for n in sys.modules if n not in before]:
            if name.split(".")[0] in ("model", "components"):
                del sys.modules[name]


def check_serving(model_uri: str, body: str):
    """Load ``model_uri`` and answer ``body`` as the scoring server would (its JSON parsing and
    schema enforcement); returns the prediction, raises when the model cannot serve it."""
    import warnings

    from mlflow.models import validate_serving_input

    with isolated_load(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # marked deprecated in favour of mlflow.models.predict,
        return validate_serving_input(model_uri, body)  # which needs an env manager


def log_checked(check, *, serving_body: str | None = None, **log_model_kwargs):
    """``mlflow.pyfunc.log_model`` with the inference code staged as ``code_paths``, then
    ``check(prediction)`` on the model's answer to ``serving_body`` (skipped when None);
    returns the model info. Nothing is registered here: a model that fails its check must not
    become a version a retried task would reuse unchecked.

    ``log_model`` itself loads the saved model and answers its input example the way the scoring
    server parses it, but only warns when that fails; its result and error are taken from that
    call (one model load, not two), and the model is loaded again only if MLflow did not make
    it."""
    import tempfile
    from unittest import mock

    import mlflow
    import mlflow.models.utils as model_utils

    seen: dict = {}
    original = model_utils._validate_serving_input

    def validate(model_uri, serving_input):
        try:
            seen["out"] = original(model_uri, serving_input)
        except Exception as e:
            seen["error"] = e
            raise
        return seen["out"]

    with tempfile.TemporaryDirectory() as tmp, isolated_load(), \
            mock.patch.object(model_utils, "_validate_serving_input", validate):
        info = mlflow.pyfunc.log_model(code_paths=stage_code(tmp), **log_model_kwargs)
    if serving_body is None:
        return info
    if "error" in seen:
        raise RuntimeError(f"the logged model {info.model_uri} cannot answer its input example "
                           f"as the scoring server would: {seen['error']}; nothing registered"
                           ) from seen["error"]
    check(seen["out"] if "out" in seen else check_serving(info.model_uri, serving_body))
    return info
