"""The ASGI app `fewshot serve` runs under uvicorn: MLflow's scoring server app for the
model that `serve.server.environment` downloaded, with the gallery routes in front of it
(`galleries.Routes`), all behind `Guard` (serve/limits.py), and the model's runtime
applied to the process (`Runtime.apply`: its threads)."""

from __future__ import annotations

import os

from mlflow.pyfunc import scoring_server
from PIL import Image

from fewshot.serve.galleries import Book, Routes
from fewshot.serve.limits import Guard, Limits
from fewshot.serve.server import MODEL_NAME, MODEL_VERSION, POLL_S, TEST_VIEWS

limits = Limits.from_env()
# Decoding refuses an image whose header declares more pixels (data/decode.py).
Image.MAX_IMAGE_PIXELS = limits.max_pixels
model = scoring_server.load_model_with_mlflow_config(os.environ[scoring_server._SERVER_MODEL_PATH])
fewshot_model = model.unwrap_python_model()
# The server's process is the model's: it computes with the CPUs this process is given.
fewshot_model.runtime.apply()
if TEST_VIEWS in os.environ:  # --test-views
    fewshot_model.method.with_test_views(int(os.environ[TEST_VIEWS]))
name, version = os.environ[MODEL_NAME], os.environ[MODEL_VERSION]
# The galleries of this model are embedded before the server answers its first request.
book = Book(os.environ.get("MLFLOW_TRACKING_URI"))
book.load(name, fewshot_model, version)
book.start(POLL_S, lambda: (fewshot_model, version))
app = Guard(Routes(scoring_server.init(model), book, fewshot_model, version, limits), limits)
