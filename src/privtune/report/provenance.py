"""What produced the results: the configuration as validated (defaults filled in) and the
software of the environment the rules ran in, for the report."""
from __future__ import annotations

import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import yaml

from privtune.io import write_atomic

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
