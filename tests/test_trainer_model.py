"""booksmith's Phi against transformers' PhiForCausalLM, the fused loss, and the HF export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from booksmith.trainer import checkpoint
from booksmith.trainer.export import export_hf, from_hf_state_dict, hf_config, to_hf_state_dict
from booksmith.trainer.loss import linear_cross_entropy
from booksmith.trainer.model import ModelConfig, Phi, padded_vocab


def _hf_model(cfg: ModelConfig) -> torch.nn.Module:
    fields = hf_config(cfg)
    for k in ("architectures", "model_type", "torch_dtype"):
        fields.pop(k)
    model = transformers.PhiForCausalLM(transformers.PhiConfig(**fields))
    torch.manual_seed(0)
    with torch.no_grad():  # random weights everywhere, biases and LayerNorms included
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


@pytest.mark.parametrize(
    ("rotary_pct", "qk_layernorm"), [(0.5, False), (0.4, False), (0.5, True), (1.0, False)]
)
def test_logits_match_transformers_phi(rotary_pct: float, qk_layernorm: bool) -> None:
    cfg = ModelConfig(
        vocab_size=256, n_layer=2, n_head=4, n_embd=64, rotary_pct=rotary_pct,
        qk_layernorm=qk_layernorm, max_seq_len=64,
    )  # fmt: skip
    hf = _hf_model(cfg)
    ours = from_hf_state_dict(cfg, hf.state_dict()).eval()
    x = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)
    # and back: our weights load into transformers with every key matched
    result = hf.load_state_dict(to_hf_state_dict(ours), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_fused_loss_matches_plain_cross_entropy() -> None:
    torch.manual_seed(0)
    model = Phi(ModelConfig(vocab_size=320, n_layer=2, n_head=2, n_embd=32, max_seq_len=64))
    x, y = torch.randint(0, 320, (4, 40)), torch.randint(0, 320, (4, 40))
    grads = []
    for fused in (True, False):
        model.zero_grad()
        loss = model(x, y, fused_loss=fused)
        (loss * 3.0).backward()  # a non-unit upstream gradient
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fused_loss_chunks_and_ignore_index(monkeypatch: pytest.MonkeyPatch) -> None:
    import booksmith.trainer.loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 3 * 64)  # 3 rows a chunk: many chunks
    h = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(64, 16, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    y = torch.randint(0, 64, (10,))
    y[[2, 7]] = -100
    linear_cross_entropy(h, w, b, y).backward()
    got = [h.grad.clone(), w.grad.clone(), b.grad.clone()]
    for t in (h, w, b):
        t.grad = None
    torch.nn.functional.cross_entropy(h @ w.T + b, y).backward()
    for a, e in zip(got, [h.grad, w.grad, b.grad], strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_vocab_is_padded_to_64() -> None:
    assert padded_vocab(256) == 256
    assert padded_vocab(49152) == 49152
    assert padded_vocab(100277) == 100288


def _save_checkpoint(tmp_path: Path, cfg: ModelConfig) -> tuple[Phi, Path]:
    torch.manual_seed(0)
    model = Phi(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    meta = {"model": cfg.to_dict(), "eot_token": 0}
    return model, checkpoint.save(tmp_path / "run", 7, model.state_dict(), {"step": 7}, meta)


def test_export_loads_in_transformers_with_same_logits(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=256, n_layer=2, n_head=4, n_embd=64, rotary_pct=0.4)
    model, ckpt = _save_checkpoint(tmp_path, cfg)
    assert (tmp_path / "run" / "latest" / "model.pt").is_file()
    out = export_hf(ckpt, tmp_path / "hf", tokenizer=False)  # a byte vocabulary: no tokenizer
    assert json.loads((out / "config.json").read_text())["model_type"] == "phi"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "PhiForCausalLM"
    x = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model.eval()(x), atol=1e-4, rtol=0)


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=256, n_layer=2, n_head=4, n_embd=64)
    _, ckpt = _save_checkpoint(tmp_path, cfg)
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        checkpoint.load_model(tmp_path / "nowhere")
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint"):
        checkpoint.load_model(tmp_path)
    # a config that does not fit the weights
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["model"]["n_embd"] = 128
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="do not fit"):
        checkpoint.load_model(ckpt)
    # one flipped byte in the weights
    data = bytearray((ckpt / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt / "model.pt").write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch"):
        checkpoint.load_model(ckpt)
