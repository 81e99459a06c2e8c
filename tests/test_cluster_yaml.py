import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_is_valid_for_the_installed_ray():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["max_workers"] >= gpu["min_workers"]
    assert any("pip install" in c and "fewshot" in c for c in cluster["setup_commands"])
    assert any("--dashboard-host=127.0.0.1" in c for c in cluster["head_start_ray_commands"])


def test_an_invalid_cluster_yaml_is_caught():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    cluster["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    try:
        jsonschema.validate(cluster, schema)
    except jsonschema.ValidationError as err:
        assert "one" in str(err.message)
    else:
        raise AssertionError("a string GPU count passed the schema")


def test_the_cluster_mlflow_server_needs_credentials():
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    (mlflow_start,) = [c for c in cluster["head_start_ray_commands"] if "mlflow server" in c]
    assert "--app-name basic-auth" in mlflow_start and "--serve-artifacts" in mlflow_start
    assert "MLFLOW_AUTH_CONFIG_PATH=/home/ubuntu/fewshot/mlflow-auth.ini" in mlflow_start
    secrets = "/home/ubuntu/.fewshot/mlflow.env"
    assert secrets in cluster["file_mounts"]
    starts = [*cluster["head_start_ray_commands"], *cluster["worker_start_ray_commands"]]
    assert all(f". {secrets}" in c for c in starts if "ray start" in c or "mlflow server" in c)
    ini = (REPO / "mlflow-auth.ini").read_text()
    assert "authenticate_request_basic_auth" in ini
    assert "admin_password" not in ini  # the password lives in the secrets file only
    assert any("mlflow[auth]" in c for c in cluster["head_setup_commands"])


@pytest.mark.cluster
def test_an_anonymous_artifact_upload_is_refused(tmp_path):
    """The basic-auth app as cluster.yaml starts it: an upload without credentials gets 401
    and stores nothing; with them it is stored. Needs the `auth` extra that cluster.yaml
    installs on the head (Flask-WTF), which the `dev` extra installs here."""
    ini = (REPO / "mlflow-auth.ini").read_text()
    ini = ini.replace("sqlite:////home/ubuntu/mlflow-auth.db", f"sqlite:///{tmp_path / 'a.db'}")
    (tmp_path / "auth.ini").write_text(ini)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-test-password-1",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret",
    }
    artifacts = tmp_path / "artifacts"
    command = [
        sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination", str(artifacts), "--serve-artifacts", "--workers", "1",
    ]  # fmt: skip
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow-artifacts/artifacts/0/evil/model.pt"

    def upload(credentials: str | None) -> int:
        request = urllib.request.Request(url, data=b"weights", method="PUT")
        if credentials:
            token = base64.b64encode(credentials.encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                status = upload(None)
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError((tmp_path / "server.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        assert status == 401
        assert not (artifacts / "0" / "evil" / "model.pt").exists()
        assert upload("admin:a-long-test-password-1") == 200
        assert (artifacts / "0" / "evil" / "model.pt").read_bytes() == b"weights"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
