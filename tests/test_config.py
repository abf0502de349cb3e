"""The config loader: built-in files, defaults, and errors that name the field and value."""

from __future__ import annotations

import pytest
import yaml

from warmserve.config import BUILTIN_CONFIGS, ConfigError, load_config, parse_config

GOOD = {
    "cluster": {"nodes": [{"name": "n0", "devices": [{"type": "cuda", "count": 4,
                                                       "memory_gib": 80}]}]},
    "models": [{"name": "m7b", "checkpoint": "synth:llama-2-7b"},
               {"name": "m13b", "checkpoint": "synth:llama-2-13b", "tensor_parallel": 2}],
}


@pytest.mark.parametrize("name", sorted(BUILTIN_CONFIGS))
def test_builtin_configs_load(name):
    config = load_config(name)
    assert config.models
    assert config.cluster.nodes[0].num_devices >= 1


def test_default_is_cpu_local_with_two_models():
    config = load_config()
    assert len(config.models) == 2
    assert {g.type for g in config.cluster.nodes[0].devices} == {"cpu"}


def test_good_file_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    config = load_config(path)
    assert config.model("m13b").tensor_parallel == 2
    assert config.policy.instance_capacity == 32  # default
    with pytest.raises(Exception):  # noqa: B017 (frozen: pydantic raises ValidationError)
        config.policy.instance_capacity = 3


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path).models == []


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"models": [{"name": "a", "checkpoint": "synth:llama-2-7b", "tensor_parallel": 3}]},
         "tensor_parallel=3 is not a power of two"),
        ({"models": [{"name": "a", "checkpoint": "synth:gpt-9"}]}, "unknown shape"),
        ({"models": [{"name": "a", "checkpoint": "s3://x"}]}, "must be SCHEME:VALUE"),
        ({"models": [{"name": "a", "checkpoint": "synth:tiny"},
                     {"name": "a", "checkpoint": "synth:tiny"}]}, "duplicate name 'a'"),
        ({"models": [{"name": "a", "checkpoint": "synth:tiny", "tensor_parallel": 8}]},
         "exceeds the largest node's 4 devices"),
        ({"models": [{"name": "a", "checkpoint": "synth:tiny", "max_context": 3}]},
         "models.0.max_context"),
        ({"policy": {"scale_down_ratio": 0.9}}, "scale_down_ratio=0.9 must be below"),
        ({"policy": {"instance_capacity": 0}}, "policy.instance_capacity"),
        ({"policy": {"ttft_slo_s": float("inf")}}, "policy.ttft_slo_s"),
        ({"policy": {"keep_alive_s": float("nan")}}, "policy.keep_alive_s"),
        ({"engine": {"block_size_tokens": "big"}}, "engine.block_size_tokens"),
        ({"server": {"port": 70000}}, "(got 70000)"),
        ({"polcy": {}}, "polcy"),
    ],
)
def test_bad_values_name_field_and_value(tmp_path, patch, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(GOOD | patch))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("models: [\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(path)


def test_missing_file_and_non_mapping():
    with pytest.raises(ConfigError, match="neither a file nor a built-in name"):
        load_config("no-such-config.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config([1, 2])


def test_unknown_model_lookup_lists_known():
    config = parse_config(GOOD)
    with pytest.raises(ConfigError, match="configured models: m7b, m13b"):
        config.model("nope")
