"""The model registry on MLflow: the pyfunc (`pyfunc.py`, preprocessing in
`preprocess.py`), registration and aliases (`versions.py`) and the promotion gate
(`gate.py`)."""
