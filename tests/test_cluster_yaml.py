import json
from pathlib import Path

import jsonschema
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
