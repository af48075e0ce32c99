"""The phi-1 architecture as transformers' PhiForCausalLM, and the arithmetic about it.

Paper §2.3: decoder-only, multi-head attention (no MQA) and the MLP applied in parallel to the same layer-norm
output (CodeGen/GPT-J style), rotary embeddings on 32 of each head's 64 dims, GELU, untied input and output
embeddings. That is exactly `model_type: phi` in transformers, so we build it there rather than by hand.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from transformers import AttentionInterface, PhiConfig, PhiForCausalLM
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# model.attn_implementation=sdpa_causal (the default): transformers' SDPA attention with a mask function that gives
# SDPA `is_causal=True` and no mask whenever the mask would be plain causal (every training step: unpadded packed
# rows, no cache). transformers' own "sdpa" does that too, but not inside torch.compile before torch 2.14
# (masking_utils._ignore_causal_mask_sdpa): there it builds a (B, 1, T, T) boolean mask, flash attention refuses
# masks, and cuDNN's masked path is 2.8x slower. One H100, torch 2.11, 1.3B shapes, micro 8, dropout 0.1
# (bench/attention_speed.py): cuDNN forward + backward 2.40 ms with is_causal, 5.75 ms with the mask; that is
# 24 layers x 4 micro-batches x 3.35 ms = 0.32 s of a 1.57 s step. Through train.py, 1.3B at micro 8: 41,832 ->
# 51,630 tokens/s (38.4% -> 47.4% MFU); 350M 118,682 -> 153,022. Padded batches (generation) still get a mask.
CAUSAL_SDPA = "sdpa_causal"


def causal_sdpa_mask(*, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                     mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None, **kwargs):
    plain_causal = (attention_mask is None and mask_function is causal_mask_function and q_length == kv_length
                    and not torch.is_tensor(q_offset) and q_offset == 0 and kv_offset == 0)
    if plain_causal:
        return None
    return sdpa_mask(q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(CAUSAL_SDPA, ALL_ATTENTION_FUNCTIONS["sdpa"])
AttentionMaskInterface.register(CAUSAL_SDPA, causal_sdpa_mask)


def padded_vocab(n: int, multiple: int = 64) -> int:
    # A multiple of 64 keeps the embedding and LM-head matmuls on tensor-core friendly shapes
    # (codegen's 50,295 tokens are padded to 51,200 = 800 × 64 for phi-1).
    return -(-n // multiple) * multiple


def hf_config(model: DictConfig, vocab_size: int, eos_token_id: int | None = None) -> PhiConfig:
    head_dim = model.d_model // model.n_head
    return PhiConfig(
        vocab_size=vocab_size,
        hidden_size=model.d_model,
        intermediate_size=model.d_mlp,
        num_hidden_layers=model.n_layer,
        num_attention_heads=model.n_head,
        num_key_value_heads=model.n_head,
        partial_rotary_factor=model.rotary_dim / head_dim,
        max_position_embeddings=model.max_seq_len,
        resid_pdrop=model.dropout,
        attention_dropout=model.dropout,
        embd_pdrop=model.embd_dropout,
        hidden_act=model.activation,
        layer_norm_eps=model.layer_norm_eps,
        initializer_range=model.init_std,
        tie_word_embeddings=False,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )


def build(model: DictConfig, vocab_size: int, eos_token_id: int | None = None) -> PhiForCausalLM:
    config = hf_config(model, vocab_size, eos_token_id)
    config._attn_implementation = model.attn_implementation
    return PhiForCausalLM(config)


def count_params(module: torch.nn.Module) -> dict[str, int]:
    """Total parameters, and the matmul ones (all but the input embedding, biases and norms)."""
    total = sum(p.numel() for p in module.parameters())
    embedding = module.get_input_embeddings().weight.numel()
    matmul = sum(p.numel() for p in module.parameters() if p.ndim == 2) - embedding
    return {"total": total, "matmul": matmul, "embedding": embedding}


def flops_per_token(matmul_params: int, n_layer: int, d_model: int, seq_len: int) -> int:
    """Training FLOPs per token: 6·N + 12·L·d·T (PaLM, appendix B; DESIGN §7).

    6·N: forward (2 FLOPs per weight per token) plus backward (4); N counts matmul weights, the LM head
    included, the input embedding (a lookup) not. 12·L·d·T: the attention score and value matmuls,
    2·2·d·T per layer forward, times 3 for backward. phi-1 at T=2048: 6 × 1.31B + 12 × 24 × 2048 × 2048
    = 7.88 + 1.21 = 9.09 GFLOP/token.
    """
    return 6 * matmul_params + 12 * n_layer * d_model * seq_len
