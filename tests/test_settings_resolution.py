"""Every preset's every run resolves to the settings recorded in tests/resolved/: a change in the schema's
defaults, a preset, ``pipeline.run_settings`` or ``RunSettings`` that moves any run's settings fails here,
naming the run and the keys. A change made on purpose is recorded by rewriting the files:

    .venv/bin/python tests/test_settings_resolution.py --write

and the diff of tests/resolved/ then shows, run by run, what it changed.
"""
import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from privtune.pipeline import expand_runs, run_settings  # noqa: E402
from privtune.training.settings import RunSettings  # noqa: E402

PRESETS = ["config.yaml", "config/tiny.yaml", "config/claims.yaml", "config/paper.yaml"]
RECORDS = ROOT / "tests/resolved"


def resolve(preset: str) -> dict:
    """{"defaults": RunSettings' defaults, "runs": {run directory: the keys where it differs from them}}."""
    cfg = yaml.safe_load(open(ROOT / preset))
    validate(cfg, str(ROOT / "workflow/schemas/config.schema.yaml"))
    defaults = asdict(RunSettings(kind="classification"))
    runs = {}
    for r in expand_runs(cfg):
        s = asdict(RunSettings(**run_settings(cfg, r)))
        runs[r.directory] = {k: v for k, v in s.items() if v != defaults.get(k)}
    return {"defaults": defaults, "runs": dict(sorted(runs.items()))}


def record_file(preset: str) -> Path:
    return RECORDS / (Path(preset).stem + ".json")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_run_resolves_as_recorded(preset):
    want = json.loads(record_file(preset).read_text())
    got = json.loads(json.dumps(resolve(preset)))  # the same JSON types as the record
    assert got["defaults"] == want["defaults"], "RunSettings' defaults changed; rewrite tests/resolved/ if on purpose"
    assert sorted(got["runs"]) == sorted(want["runs"]), f"{preset}: the set of runs changed"
    moved = {run: sorted(k for k in {*s, *want["runs"][run]} if s.get(k) != want["runs"][run].get(k))
             for run, s in got["runs"].items() if s != want["runs"][run]}
    assert not moved, (f"{preset}: settings moved in {len(moved)} run(s), e.g. {next(iter(moved.items()))}; "
                       "if on purpose, rewrite tests/resolved/ (see this module's docstring)")


def test_the_records_are_not_vacuous():
    """Each record holds every run with its own values (a DP run its ε and Poisson sampling, a baseline
    shuffled epochs)."""
    rec = json.loads(record_file("config.yaml").read_text())
    private = [s for s in rec["runs"].values() if s.get("epsilon") is not None]
    assert private and all(s.get("sampling", rec["defaults"]["sampling"]) == "poisson" for s in private)
    baselines = [d for d in rec["runs"] if "eps~inf" in d]
    assert baselines and all(rec["runs"][d].get("sampling") == "shuffle" for d in baselines)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    RECORDS.mkdir(exist_ok=True)
    for p in PRESETS:
        record_file(p).write_text(json.dumps(resolve(p), indent=1, sort_keys=True) + "\n")
        print("wrote", record_file(p))
