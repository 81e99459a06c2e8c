"""The file MLflow runs to build a logged fewshot model ("models from code").

MLflow copies it into every logged model and executes it on load; the weights and
preprocessing then reach `FewShotModel.load_context` as artifact and model_config.
"""

from mlflow.models import set_model

from fewshot.registry.pyfunc import FewShotModel

set_model(FewShotModel())
