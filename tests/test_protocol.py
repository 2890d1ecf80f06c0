"""scripts/protocol.py's favourable settings: every method, STL and STL+ of a setting train on one split."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from helpers import GIN, REPO


def _protocol():
    spec = importlib.util.spec_from_file_location("protocol", REPO / "scripts" / "protocol.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["protocol"] = module
    spec.loader.exec_module(module)
    return module


protocol = _protocol()


def _seed(seed: int) -> list[str]:
    return [f"train.seed = {seed}", f"LowDataSplit.seed = {seed}", "LowDataSplit.labels_per_class = 5"]


@pytest.mark.parametrize("name", sorted(protocol.SETTINGS))
def test_baselines_and_methods_of_a_setting_see_the_same_split(name):
    setting = protocol.SETTINGS[name]
    methods = protocol.setting_methods(setting)
    prints = {key: protocol.split_fingerprint([setting.gin], [*methods[key].params, *_seed(1)])
              for key in ("stl", "stl_plus", "equal")}
    assert len({tuple(sorted(p.items())) for p in prints.values()}) == 1, prints
    assert set(prints["stl"]) >= {"labeled", "aux", "val", "test", "labeled images"}
    # the fingerprint tells splits apart: another seed is another split
    other = protocol.split_fingerprint([setting.gin], [*methods["stl"].params, *_seed(2)])
    assert all(other[part] != prints["stl"][part] for part in ("labeled", "aux", "val", "test"))


def test_setting_methods_bind_their_weighting_and_stl_plus_its_extra_labels():
    setting = protocol.SETTINGS["min_data"]
    methods = protocol.setting_methods(setting)
    assert set(protocol.WEIGHTINGS) == set(methods)
    for key, (label, name, extra) in protocol.WEIGHTINGS.items():
        assert (GIN / "weightings" / f"{name}.gin").is_file(), name
        assert methods[key].params == (f"include 'weightings/{name}.gin'", *extra)
        assert methods[key].gin == setting.gin and methods[key].label == label
    assert methods["stl"].aux_tasks == "none" and methods["stl_plus"].aux_tasks == "none (labels + aux set)"
    assert "digit/Task.pool = 'labeled+aux'" in methods["stl_plus"].params
    assert methods["equal"].aux_tasks == setting.aux_tasks


def test_a_setting_method_parses_to_its_weighting(tmp_path):
    import gin

    from auxframe import config

    setting = protocol.SETTINGS["domains"]
    config.reset()
    try:
        config.parse([setting.gin], list(protocol.setting_methods(setting)["arml"].params))
        assert gin.query_parameter("train.weighting").selector == "weightings.arml"
    finally:
        config.reset()
