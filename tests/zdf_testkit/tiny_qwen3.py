"""Tiny random Qwen3 text encoders for tests: config, weights, the four on-disk layouts, and an
independent transformers reference.

Stable API (other test modules rely on it):

- ``tiny_config(hidden=64, layers=4, heads=1, kv_heads=1, intermediate=128, vocab=151936,
  rope_theta=1e6, rms_norm_eps=1e-6) -> dict`` — HF Qwen3 ``config.json`` content. ``head_dim`` is
  always 128 (ComfyUI's Qwen3 config hard-codes it), so ``q_proj`` has ``heads * 128`` rows.
  ComfyUI needs ``layers >= 3`` and ``vocab >= 151646`` (the template ids go up to 151645).
- ``make_state_dict(config, seed=0, dtype=torch.float32, lm_head=False) -> dict[str, Tensor]`` —
  random weights in HF ``Qwen3Model`` naming with the ``model.`` prefix (``lm_head.weight``
  optionally), q_norm/k_norm included, scaled so hidden states stay O(1).
- ``flat_state_dict(sd) -> dict`` — the Qwen3-Embedding layout (no ``model.`` prefix, no lm_head).
- ``save_single_file(sd, path, flat=False) -> Path``
- ``save_hf_folder(sd, config, folder, shards=1, flat=False) -> Path`` — ``config.json`` plus
  ``model.safetensors`` (shards=1) or ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``.
- ``hf_hidden_states(sd, config, input_ids) -> tuple[Tensor, ...]`` — transformers ``Qwen3Model``
  ``output_hidden_states`` in fp32/eval: ``layers + 1`` tensors ``[1, T, hidden]`` (0 = embeddings,
  last = final-normed output).
- ``hf_model(sd, config)`` / ``run_hidden_states(model, input_ids)`` — the same reference, model built once.
- ``zimage_ids(prompt_ids) -> list[int]`` — the Z-Image chat template around explicit token ids
  (core-tier tests have no tokenizer; ComfyUI's ``qwen25_tokenizer`` exists only in the host tier).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file

HEAD_DIM = 128
IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643
_PREFIX = (IM_START, 872, 198)
_SUFFIX = (IM_END, 198, IM_START, 77091, 198)


def tiny_config(hidden: int = 64, layers: int = 4, heads: int = 1, kv_heads: int = 1, intermediate: int = 128,
                vocab: int = 151936, rope_theta: float = 1e6, rms_norm_eps: float = 1e-6) -> dict:
    """HF ``config.json`` content of a small Qwen3 model (head_dim fixed at 128)."""
    return {
        "architectures": ["Qwen3Model"],
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": HEAD_DIM,
        "vocab_size": vocab,
        "rope_theta": rope_theta,
        "rms_norm_eps": rms_norm_eps,
        "max_position_embeddings": 40960,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def make_state_dict(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                    lm_head: bool = False) -> dict[str, torch.Tensor]:
    """Random weights in HF ``Qwen3Model`` naming with the ``model.`` prefix."""
    g = torch.Generator().manual_seed(seed)
    h, inter = config["hidden_size"], config["intermediate_size"]
    q, kv = config["num_attention_heads"] * HEAD_DIM, config["num_key_value_heads"] * HEAD_DIM

    def lin(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) * (0.5 / math.sqrt(cols))

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    sd = {"model.embed_tokens.weight": torch.randn(config["vocab_size"], h, generator=g)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(h)
        sd[p + "post_attention_layernorm.weight"] = norm(h)
        sd[p + "self_attn.q_proj.weight"] = lin(q, h)
        sd[p + "self_attn.k_proj.weight"] = lin(kv, h)
        sd[p + "self_attn.v_proj.weight"] = lin(kv, h)
        sd[p + "self_attn.o_proj.weight"] = lin(h, q)
        sd[p + "self_attn.q_norm.weight"] = norm(HEAD_DIM)
        sd[p + "self_attn.k_norm.weight"] = norm(HEAD_DIM)
        sd[p + "mlp.gate_proj.weight"] = lin(inter, h)
        sd[p + "mlp.up_proj.weight"] = lin(inter, h)
        sd[p + "mlp.down_proj.weight"] = lin(h, inter)
    sd["model.norm.weight"] = norm(h)
    if lm_head:
        sd["lm_head.weight"] = lin(config["vocab_size"], h)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def flat_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen3-Embedding layout: strip ``model.``, drop ``lm_head.*``."""
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()
            if not k.startswith("lm_head.")}


def save_single_file(sd: dict[str, torch.Tensor], path: str | Path, flat: bool = False) -> Path:
    """One ``.safetensors`` file (ComfyUI layout, or flat Qwen3-Embedding layout)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat_state_dict(sd) if flat else dict(sd), str(path))
    return path


def save_hf_folder(sd: dict[str, torch.Tensor], config: dict, folder: str | Path, shards: int = 1,
                   flat: bool = False) -> Path:
    """An HF model folder: ``config.json`` and one or ``shards`` safetensors files (+ index)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    data = flat_state_dict(sd) if flat else dict(sd)
    if shards <= 1:
        save_file(data, str(folder / "model.safetensors"))
        return folder
    keys = sorted(data)
    per = math.ceil(len(keys) / shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: data[k] for k in keys[s * per:(s + 1) * per]}
        save_file(part, str(folder / name))
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def hf_model(sd: dict[str, torch.Tensor], config: dict):
    """transformers ``Qwen3Model`` (fp32, eval, eager attention) holding ``sd`` — build once, run many times."""
    from transformers import Qwen3Config, Qwen3Model

    cfg = Qwen3Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")})
    cfg._attn_implementation = "eager"
    model = Qwen3Model(cfg).eval()
    weights = {k[len("model."):] if k.startswith("model.") else k: v.float() for k, v in sd.items()
               if not k.startswith("lm_head.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise ValueError(f"reference model: missing {missing}, unexpected {unexpected}")
    return model


def run_hidden_states(model, input_ids: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """``output_hidden_states`` of a model from :func:`hf_model` for one sequence (no padding, no mask)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(input_ids)], dtype=torch.long), output_hidden_states=True)
    return tuple(h.float() for h in out.hidden_states)


def hf_hidden_states(sd: dict[str, torch.Tensor], config: dict, input_ids: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """transformers ``Qwen3Model`` hidden states (fp32, eval, eager attention) — the independent reference."""
    return run_hidden_states(hf_model(sd, config), input_ids)


def zimage_ids(prompt_ids: Sequence[int]) -> list[int]:
    """Z-Image chat template ids around ``prompt_ids``."""
    return [*_PREFIX, *[int(i) for i in prompt_ids], *_SUFFIX]
