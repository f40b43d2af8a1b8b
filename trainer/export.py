"""Hugging Face format: booksmith's Phi <-> transformers' PhiForCausalLM.

`export_hf(ckpt, out_dir)` writes config.json (model_type "phi") and model.safetensors, which
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads with the same logits, the
tokenizer of the encoding the model was trained on (shards/hf_tokenizer.py: `AutoTokenizer`
encodes as the token shards), and generation_config.json; end-of-text is the EOS and the padding
token in all of them. The only renaming is booksmith's fused `in_proj` ([q | k | v | fc1]), split
back into four Linears.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch

from booksmith.trainer.model import Block, ModelConfig, Phi


def hf_config(cfg: ModelConfig, eot_token: int | None = None) -> dict[str, Any]:
    """The transformers PhiConfig fields for this model."""
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "hidden_act": "gelu_new",
        "max_position_embeddings": cfg.max_seq_len,
        "layer_norm_eps": cfg.layer_norm_eps,
        "qk_layernorm": cfg.qk_layernorm,
        "partial_rotary_factor": cfg.rotary_pct,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.rotary_pct,
        },
        "resid_pdrop": cfg.resid_pdrop,
        "embd_pdrop": cfg.embd_pdrop,
        "attention_dropout": cfg.attn_pdrop,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": False,
        "bos_token_id": eot_token,
        "eos_token_id": eot_token,
        "pad_token_id": eot_token,
        "torch_dtype": "float32",
    }


def generation_config(eot_token: int | None) -> dict[str, Any]:
    """generation_config.json: generation stops at end-of-text and pads with it."""
    return {"bos_token_id": eot_token, "eos_token_id": eot_token, "pad_token_id": eot_token}


def to_hf_state_dict(model: Phi) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    D, ff = cfg.n_embd, cfg.intermediate_size
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.final_layernorm.weight": model.final_ln.weight,
        "model.final_layernorm.bias": model.final_ln.bias,
        "lm_head.weight": model.lm_head.weight,
        "lm_head.bias": model.lm_head.bias,
    }
    for i, layer in enumerate(model.layers):
        block = cast(Block, layer)
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = block.ln.weight
        out[p + "input_layernorm.bias"] = block.ln.bias
        for kind in ("weight", "bias"):
            q, k, v, fc1 = getattr(block.in_proj, kind).split([D, D, D, ff], dim=0)
            out[p + f"self_attn.q_proj.{kind}"] = q
            out[p + f"self_attn.k_proj.{kind}"] = k
            out[p + f"self_attn.v_proj.{kind}"] = v
            out[p + f"mlp.fc1.{kind}"] = fc1
            out[p + f"self_attn.dense.{kind}"] = getattr(block.dense, kind)
            out[p + f"mlp.fc2.{kind}"] = getattr(block.fc2, kind)
            if cfg.qk_layernorm:
                out[p + f"self_attn.q_layernorm.{kind}"] = getattr(block.q_ln, kind)
                out[p + f"self_attn.k_layernorm.{kind}"] = getattr(block.k_ln, kind)
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> Phi:
    """Build booksmith's Phi from a transformers PhiForCausalLM state dict."""
    model = Phi(cfg)
    ours: dict[str, torch.Tensor] = {
        "embed.weight": sd["model.embed_tokens.weight"],
        "final_ln.weight": sd["model.final_layernorm.weight"],
        "final_ln.bias": sd["model.final_layernorm.bias"],
        "lm_head.weight": sd["lm_head.weight"],
        "lm_head.bias": sd["lm_head.bias"],
    }
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        ours[q + "ln.weight"] = sd[p + "input_layernorm.weight"]
        ours[q + "ln.bias"] = sd[p + "input_layernorm.bias"]
        for kind in ("weight", "bias"):
            parts = [sd[p + f"self_attn.{n}_proj.{kind}"] for n in "qkv"]
            ours[q + f"in_proj.{kind}"] = torch.cat([*parts, sd[p + f"mlp.fc1.{kind}"]], dim=0)
            ours[q + f"dense.{kind}"] = sd[p + f"self_attn.dense.{kind}"]
            ours[q + f"fc2.{kind}"] = sd[p + f"mlp.fc2.{kind}"]
            if cfg.qk_layernorm:
                ours[q + f"q_ln.{kind}"] = sd[p + f"self_attn.q_layernorm.{kind}"]
                ours[q + f"k_ln.{kind}"] = sd[p + f"self_attn.k_layernorm.{kind}"]
    model.load_state_dict(ours)
    return model


def export_hf(
    ckpt: Path, out_dir: Path, *, encoding: str | None = None, tokenizer: bool = True
) -> Path:
    """Write `out_dir/config.json`, `model.safetensors`, `generation_config.json` and (unless
    `tokenizer` is false) the tokenizer files of `encoding` (default: the one the checkpoint
    trained on) from a booksmith checkpoint. An encoding with no tokenizer raises
    TokenizerExportError before anything is written."""
    from safetensors.torch import save_file

    from booksmith.shards.hf_tokenizer import TokenizerExportError, load_encoding
    from booksmith.trainer.checkpoint import load_model

    model, meta = load_model(ckpt)
    eot = meta.get("eot_token")
    name = encoding or meta.get("encoding")
    if tokenizer:
        if not name:
            raise TokenizerExportError(
                f"{ckpt}: the checkpoint names no encoding, so no tokenizer can be exported: "
                "name it with --encoding NAME, or export the weights alone with --no-tokenizer"
            )
        enc = load_encoding(name)  # fails here, before any file is written
        eot = enc.eot_token
        if enc.n_vocab > model.cfg.vocab_size:
            raise TokenizerExportError(
                f"{ckpt}: encoding {name!r} has {enc.n_vocab} tokens, the model "
                f"{model.cfg.vocab_size}: name the encoding it trained on with --encoding NAME"
            )
        if meta.get("eot_token") not in (None, eot):
            raise TokenizerExportError(
                f"{ckpt}: trained with end-of-text {meta['eot_token']}, but encoding {name!r} "
                f"has {eot}: name the encoding it trained on with --encoding NAME"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer and name:
        from booksmith.shards.hf_tokenizer import write_hf_tokenizer

        write_hf_tokenizer(name, out_dir, model_max_length=model.cfg.max_seq_len)
    save_file(
        to_hf_state_dict(model), str(out_dir / "model.safetensors"), metadata={"format": "pt"}
    )
    _write_json(out_dir / "config.json", hf_config(model.cfg, eot))
    _write_json(out_dir / "generation_config.json", generation_config(eot))
    return out_dir


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
