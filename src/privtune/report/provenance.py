"""What produced the results: the configuration as validated (defaults filled in) and the
software of the environment the rules ran in, for the report."""
from __future__ import annotations

import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import yaml

from privtune.io import write_atomic
from privtune.pipeline import canonical

PACKAGES = ("privtune", "torch", "transformers", "tokenizers", "peft", "opacus", "dp-accounting", "sacrebleu",
            "rouge-score", "pycocoevalcap", "nltk", "numpy", "scipy", "pandas", "matplotlib", "snakemake",
            "datasets", "gguf")


def software_versions() -> list[tuple[str, str]]:
    """(component, version) of Python, the platform, the packages above, CUDA, Java and the git commit."""
    rows = [("python", platform.python_version()), ("platform", platform.platform()),
            ("executable", sys.executable)]
    for pkg in PACKAGES:
        try:
            rows.append((pkg, version(pkg)))
        except PackageNotFoundError:
            rows.append((pkg, "not installed"))
    try:
        import torch

        rows.append(("cuda", torch.version.cuda or "none (CPU build)"))
        rows.append(("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"))
    except ImportError:
        pass
    rows.append(("java", _first_line(["java", "-version"], stderr=True)))
    commit = _first_line(["git", "rev-parse", "HEAD"])
    rows.append(("git commit", commit))
    if commit != "not found":
        rows.append(("git status", "clean" if _first_line(["git", "status", "--porcelain"]) == "" else
                     "uncommitted changes"))
    return rows


def _first_line(cmd: list[str], stderr: bool = False) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    text = (p.stderr if stderr else p.stdout).strip()
    if p.returncode != 0:
        return "not found"
    return text.splitlines()[0] if text else ""


def write_provenance(config: dict, config_out, versions_out) -> None:
    write_atomic(config_out, "# The configuration of this run, as validated (defaults filled in).\n"
                 + yaml.safe_dump(config, sort_keys=True, allow_unicode=True))
    write_atomic(versions_out, "component\tversion\n" + "".join(f"{k}\t{v}\n" for k, v in software_versions()))


def provenance_text(config: dict, paper: str) -> str:
    """A few lines for a report caption: the preset and, per experiment of ``paper``, what it ran."""
    lines = [f"Preset **{config['preset']}**; data from ``{config.get('data_dir')}``."]
    for e in config["experiments"]:
        if e["paper"] != paper:
            continue
        train = {**config.get("train_defaults", {}), **e.get("train", {})}
        keys = ("batch_size", "lr", "epochs", "steps", "clip_norm", "optimizer", "sampling", "delta")
        hp = ", ".join(f"{k}={train[k]}" for k in keys if train.get(k) is not None)
        sweep = e.get("sweep")
        lines.append(f"Experiment ``{e['name']}``: task {e['task']}, models {', '.join(e['models'])}, methods "
                     f"{', '.join(e['methods'])}, ε {', '.join(map(str, e['epsilons']))}, seeds "
                     f"{', '.join(map(str, e['seeds']))}; {hp}"
                     + (f"; objective {e['objective']}" if e["objective"] != "head" else "")
                     + ("; zero-shot row" if e.get("zero_shot") else "")
                     + (f"; sweep {' × '.join(f'{k} {v}' for k, v in sweep.items())}" if sweep else "")
                     + (f"; child {canonical(e['child'])}" if set(e["methods"]) & {"ct_f", "ct_d"} else "") + ".")
    return "\n".join(f"* {line}" for line in lines)
