"""Defaults are written once, in the config schema; the Python that repeats them (for use outside
Snakemake) agrees with it, and the workflow glue reads the validated config instead of carrying its own."""
import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
EXPERIMENT = SCHEMA["properties"]["experiments"]["items"]["properties"]


def _defaults(props: dict) -> dict:
    return {k: v["default"] for k, v in props.items() if "default" in v}


def test_run_settings_repeat_the_schema_training_defaults():
    from privtune.training.settings import RunSettings

    schema = _defaults(SCHEMA["properties"]["train_defaults"]["properties"])
    fields = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(RunSettings)}
    assert set(schema) == set(SCHEMA["$defs"]["train"]["properties"]), "every training key has its default"
    assert {k: fields[k] for k in schema} == schema
    child = _defaults(EXPERIMENT["child"]["properties"])
    assert (fields["p_f"], fields["child_strict"]) == (child["p_f"], child["strict"])
    assert fields["max_length"] == SCHEMA["properties"]["datasets"]["additionalProperties"]["properties"][
        "max_length"]["default"]
    assert fields["objective"] == EXPERIMENT["objective"]["default"]


def test_the_fisher_mask_defaults_are_the_schema_ones():
    from privtune.childtuning.fisher import compute_mask_file

    params = inspect.signature(compute_mask_file).parameters
    child = _defaults(EXPERIMENT["child"]["properties"])
    assert params["batch_size"].default == child["fisher_batch_size"]
    assert params["fisher_clip"].default == child["fisher_clip"]
    assert params["delta"].default == SCHEMA["properties"]["train_defaults"]["properties"]["delta"]["default"]


def test_method_options_defaults_are_the_schema_ones():
    from privtune.models.methods import DEFAULTS

    props = EXPERIMENT["method_options"]["properties"]
    assert DEFAULTS == {m: _defaults(props[m]["properties"]) for m in DEFAULTS}


@pytest.mark.parametrize("module", ["pipeline.py", "evaluate.py"])
def test_the_glue_carries_no_default_of_its_own(module):
    """No ``x.get("key", <value>)`` where the schema gives key a default: the validated config already has it."""
    keys = set()

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "properties":
                    keys.update(name for name, sub in v.items() if isinstance(sub, dict) and "default" in sub)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(SCHEMA)
    tree = ast.parse((ROOT / "src/privtune" / module).read_text())
    found = []
    for call in ast.walk(tree):
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "get"
                and len(call.args) == 2 and isinstance(call.args[0], ast.Constant) and call.args[0].value in keys
                and isinstance(call.args[1], ast.Constant) and call.args[1].value is not None):
            found.append(f"line {call.lineno}: .get({call.args[0].value!r}, {call.args[1].value!r})")
    assert not found, found


def test_validation_fills_the_training_defaults_and_an_experiment_overrides_them():
    from snakemake.utils import validate

    from privtune.pipeline import expand_runs, run_settings

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["train_defaults"] = {"lr": 0.01}
    validate(cfg, str(ROOT / "workflow/schemas/config.schema.yaml"))
    assert cfg["train_defaults"]["clip_norm"] == 0.1 and cfg["train_defaults"]["lr"] == 0.01
    runs = expand_runs(cfg)
    private = next(r for r in runs if r.private and not r.zero_shot)
    s = run_settings(cfg, private)
    e = private.exp(cfg)
    assert s["lr"] == e.get("train", {}).get("lr", 0.01)
    assert "clip_norm" not in e.get("train", {}) or s["clip_norm"] == e["train"]["clip_norm"]
