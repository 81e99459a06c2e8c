"""A trained few-shot model as an MLflow pyfunc: raw images in, labels out.

Request (the pyfunc input; over HTTP `{"inputs": {...}}`), three named 1-D string tensors:

    support_images  [S]  base64 PNG or JPEG, any size and mode (L, RGB, RGBA, P)
    support_labels  [S]  the caller's class name of each support image
    query_images    [M]  base64 PNG or JPEG

Answer: one `{"label": str, "probabilities": {label: float}}` per query, in order.
Class i of the task is the i-th distinct label of `support_labels`; classes may have
different numbers of support images.

The logged model holds the model file (`model.pt`, model_file.py)
as an artifact and the preprocessing as its `model_config`, so loading it needs
only this package installed, never the dataset. It is logged "from code"
(`model_code.py`), not pickled: MLflow refuses pickled models by default.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, DataType, Map, Schema, TensorSpec
from PIL import Image

import fewshot
from fewshot import model_file
from fewshot.config import Config
from fewshot.errors import FewShotError, RegistryError, RequestError
from fewshot.methods.base import Predictor
from fewshot.registry.preprocess import Preprocessing
from fewshot.runtime import Runtime

INPUTS = ("support_images", "support_labels", "query_images")
SIGNATURE = ModelSignature(
    # The scoring server checks request dtypes strictly: every input is a string tensor.
    inputs=Schema([TensorSpec(np.dtype(str), (-1,), name) for name in INPUTS]),
    outputs=Schema(
        [ColSpec(DataType.string, "label"), ColSpec(Map(DataType.double), "probabilities")]
    ),
)
MODEL_CODE = Path(__file__).with_name("model_code.py")
ARTIFACT = "model"  # the key of model.pt among the logged model's artifacts


class FewShotModel(mlflow.pyfunc.PythonModel):
    """The pyfunc. `classify` is the Python API (bytes in, raises `RequestError`);
    `predict` is MLflow's (base64 tensors in, raises MLflow's 400 error)."""

    # The signature is explicit (SIGNATURE), so predict has no type hints for MLflow to
    # build one from; this flag stops MLflow warning that they are missing.
    _skip_type_hint_validation = True
    config: Config
    method: Predictor  # a method, or an ensemble of them
    preprocessing: Preprocessing
    runtime: Runtime  # how it computes on the machine that loaded it

    def load_context(self, context) -> None:
        config, method = model_file.load(context.artifacts[ARTIFACT], "a registered fewshot model")
        self.use(config, method, Preprocessing.from_dict(context.model_config))

    def use(self, config: Config, method: Predictor, preprocessing: Preprocessing) -> FewShotModel:
        """Answer with `method`, trained under `config`, computing as this machine does
        best (`Runtime.for_inference`), on the threads of the process that loads it (a
        server applies its own: serve/)."""
        self.config, self.preprocessing = config, preprocessing
        self.runtime = Runtime.for_inference()
        self.method = method.eval().to(
            self.runtime.device, memory_format=self.runtime.memory_format
        )
        return self

    def predict(self, context, model_input, params=None):
        """model_input: {name: 1-D string array} for the three INPUTS -> list of answers."""
        try:
            return self.classify(
                decode_base64(model_input["support_images"], "support_images"),
                [str(label) for label in model_input["support_labels"]],
                decode_base64(model_input["query_images"], "query_images"),
            )
        except FewShotError as exc:
            # MLflow turns its own exception into a 400 with a JSON body; any other
            # exception would become a generic message with our stack trace.
            raise mlflow.MlflowException.invalid_parameter_value(str(exc)) from None

    def check_task(self, n_way: int) -> None:
        """Refuse a task shape the method cannot answer (MAML's head has a fixed width)."""
        method = self.method
        if not method.answers_way(n_way):
            raise RequestError(
                f"support_labels: this model cannot answer a {n_way}-way task ({method.name} "
                f"with these settings answers only the {method.shape.n_way}-way tasks it was "
                f"trained on; train a separate model for {n_way}-way)"
            )

    def classify(
        self,
        support_images: Sequence[bytes],
        support_labels: Sequence[str],
        query_images: Sequence[bytes],
    ) -> list[dict]:
        """Encoded support images with their labels, encoded queries -> one
        `{"label", "probabilities"}` per query."""
        support = self.support_set(support_images, support_labels)
        return answers(support.classes, self.predict_task(support, self.queries(query_images)))

    def predict_task(self, support: SupportSet, query_x: torch.Tensor) -> torch.Tensor:
        """The task's logits [M, N] as this model computes them (`Runtime.predict`)."""
        return self.runtime.predict(self.method, support.x, support.y, query_x)

    def support_set(
        self, support_images: Sequence[bytes], support_labels: Sequence[str]
    ) -> SupportSet:
        """Encoded support images with their labels -> the task's classes and tensors,
        refused when the task is malformed or the model cannot answer it."""
        if len(support_images) != len(support_labels):
            raise RequestError(
                f"support_labels: {len(support_labels)} labels for {len(support_images)} "
                "support_images; give one label per support image"
            )
        classes, y = self.classes_of(support_labels)
        x = self.preprocessing.tensor(support_images, "support_images")  # [S, C, H, W]
        return SupportSet(classes, x, y)

    def classes_of(self, support_labels: Sequence[str]) -> tuple[list[str], torch.Tensor]:
        """Support labels -> the task's classes (in order of first appearance) and each
        support's class index y [S] in 0..N-1, refused when the model cannot answer it."""
        classes = list(dict.fromkeys(support_labels))
        if len(classes) < 2:
            raise RequestError(
                f"support_labels: {len(classes)} distinct class(es) {classes}; "
                "a task needs at least 2"
            )
        self.check_task(len(classes))
        index = {label: i for i, label in enumerate(classes)}
        return classes, torch.tensor([index[label] for label in support_labels])

    def queries(self, query_images: Sequence[bytes]) -> torch.Tensor:
        """Encoded queries -> float [M, C, H, W]."""
        if not query_images:
            raise RequestError("query_images: empty; send at least one image to classify")
        return self.preprocessing.tensor(query_images, "query_images")


@dataclass(frozen=True)
class SupportSet:
    classes: list[str]  # the caller's labels; class i is the i-th distinct one
    x: torch.Tensor  # [S, C, H, W]
    y: torch.Tensor  # [S] in 0..N-1


def answers(classes: list[str], logits: torch.Tensor) -> list[dict]:
    """Logits [M, N] over `classes` -> one `{"label", "probabilities"}` per query."""
    probabilities = torch.softmax(logits.float(), dim=1)
    return [
        {
            "label": classes[int(p.argmax())],
            "probabilities": dict(zip(classes, p.tolist(), strict=True)),
        }
        for p in probabilities
    ]


def decode_base64(texts: Sequence[str], name: str) -> list[bytes]:
    """The base64 strings of input `name` -> encoded images."""
    blobs = []
    for i, text in enumerate(texts):
        try:
            blobs.append(base64.b64decode(str(text), validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(
                f"{name}[{i}]: not base64; send the image file's bytes base64-encoded"
            ) from None
    return blobs


def input_example(config: Config, preprocessing: Preprocessing) -> dict[str, np.ndarray]:
    """A task of the training shape (n_way classes, 1 shot, 1 query) of flat grey squares:
    small, and valid for every method (MAML only answers its training n_way)."""
    n_way, size = config.episode.n_way, preprocessing.image_size

    def png(level: int) -> str:
        buffer = io.BytesIO()
        Image.new("L", (size, size), level).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    images = [png(255 * i // n_way) for i in range(n_way)]
    return {
        "support_images": np.array(images),
        "support_labels": np.array([f"class_{i}" for i in range(n_way)]),
        "query_images": np.array(images[:1]),
    }


def log_model(run_id: str, path: Path, config: Config, preprocessing: Preprocessing) -> str:
    """Log the pyfunc of the model file at `path` into training run `run_id` of MLflow's
    current tracking URI; returns the logged model's URI (`models:/m-...`)."""
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="fewshot",
            python_model=str(MODEL_CODE),
            artifacts={ARTIFACT: str(path)},
            model_config=preprocessing.as_dict(),
            signature=SIGNATURE,
            input_example=input_example(config, preprocessing),
            # The package pins torch, MLflow and the rest; inferring requirements would
            # import the model in a subprocess for nothing.
            pip_requirements=[f"fewshot=={fewshot.__version__}"],
        )
    return info.model_uri


def load_model(uri: str) -> FewShotModel:
    """A fewshot model by any MLflow model URI (`models:/NAME@champion`, `runs:/...`, a
    path), resolved against MLflow's current tracking URI (`versions.load` sets it)."""
    try:
        model = mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # MLflow raises its own, OSError or ValueError by URI kind
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RegistryError(
            f"model {uri}: cannot load it ({first}); "
            "give models:/NAME@ALIAS, runs:/RUN_ID/fewshot or a model folder"
        ) from None
    python_model = model.unwrap_python_model()
    if not isinstance(python_model, FewShotModel):
        raise RegistryError(
            f"model {uri}: not a fewshot model; register one with `fewshot register`"
        )
    return python_model
