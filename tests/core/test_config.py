"""The shared config machinery: YAML loading, --set overrides, readable errors."""

import pytest

from core.config import (
    ConfigError,
    apply_overrides,
    config_hash,
    flatten,
    load_config,
    parse_override,
)
from curation.config import CurationConfig


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def errors_of(model, path=None, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(model, path, overrides)
    return info.value.problems


def test_overrides_parse_yaml_values():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("name=my data") == (["name"], "my data")
    data = apply_overrides({"l": [{"x": 1}, {"x": 2}]}, ["l.1.x=5", "new.deep.key=on"])
    assert data == {"l": [{"x": 1}, {"x": 5}], "new": {"deep": {"key": True}}}
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="'l.7' is not an index of a list of 2"):
        apply_overrides({"l": [1, 2]}, ["l.7=1"])


def test_file_then_overrides(tmp_path):
    path = write(tmp_path, "name: clips\nsplit:\n  threshold: 30\n")
    cfg = load_config(CurationConfig, path, ["split.min_clip_s=3", "select.min_aesthetic=null"])
    assert (cfg.name, cfg.split.threshold, cfg.split.min_clip_s) == ("clips", 30.0, 3.0)
    assert cfg.select.min_aesthetic is None
    assert cfg.split.max_clip_s == 60.0  # default kept


def test_unknown_key_lists_allowed_keys(tmp_path):
    path = write(tmp_path, "split:\n  treshold: 30\nbogus: 1\n")
    problems = errors_of(CurationConfig, path)
    assert (
        "split.treshold: unknown key; allowed keys here: drop_transitions, enabled, gradual, max_clip_s, min_clip_s, threshold, transnet, transnet_threshold, transnet_weights"
        in problems
    )
    assert any(
        p.startswith("bogus: unknown key; allowed keys here: aesthetic, allow_inputs, block_size")
        for p in problems
    )


def test_bad_type_and_bad_range_name_field_value_and_limit(tmp_path):
    problems = errors_of(CurationConfig, None, ["split.threshold=high", "frames.num_frames=1"])
    assert (
        "split.threshold: Input should be a valid number, unable to parse string as a number (got 'high')"
        in problems
    )
    assert "frames.num_frames: Input should be greater than or equal to 2 (got 1)" in problems
    problems = errors_of(CurationConfig, None, ["motion.algorithm=raft"])
    assert problems == ["motion.algorithm: Input should be 'dis' or 'farneback' (got 'raft')"]


def test_cross_field_errors_name_settings(tmp_path):
    problems = errors_of(CurationConfig, None, ["split.min_clip_s=90"])
    assert problems == [
        "split: split.min_clip_s (90.0) must be smaller than split.max_clip_s (60.0)"
    ]


def test_yaml_problems_name_file_and_line(tmp_path):
    path = write(tmp_path, "name: a\nsplit: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(CurationConfig, path)
    assert str(path) in str(info.value) and "line 3" in str(info.value)
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        load_config(CurationConfig, path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(CurationConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(CurationConfig, bad)


def test_hash_and_flatten():
    a = load_config(CurationConfig)
    b = load_config(CurationConfig, None, ["split.threshold=27"])
    c = load_config(CurationConfig, None, ["split.threshold=28"])
    assert config_hash(a) == config_hash(b) != config_hash(c)
    flat = flatten(a)
    assert flat["split.threshold"] == 27.0 and flat["select.max_ocr_area"] == 0.02
    assert flatten({"stages": [{"lr": 1}, {"lr": 2}]}) == {"stages.0.lr": 1, "stages.1.lr": 2}
