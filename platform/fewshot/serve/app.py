"""The ASGI app `fewshot serve` runs under uvicorn: MLflow's scoring server app for the
model that `serve.server.environment` downloaded, behind `Guard` (serve/limits.py), with
the model's runtime applied to the process (`Runtime.apply`: its threads)."""

from __future__ import annotations

import os

from mlflow.pyfunc import scoring_server
from PIL import Image

from fewshot.serve.limits import Guard, Limits

limits = Limits.from_env()
# Decoding refuses an image whose header declares more pixels (data/decode.py).
Image.MAX_IMAGE_PIXELS = limits.max_pixels
model = scoring_server.load_model_with_mlflow_config(os.environ[scoring_server._SERVER_MODEL_PATH])
# The server's process is the model's: it computes with the CPUs this process is given.
model.unwrap_python_model().runtime.apply()
app = Guard(scoring_server.init(model), limits)
