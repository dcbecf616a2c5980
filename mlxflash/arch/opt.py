"""OPT (Zhang et al. 2022), the paper's model: ReLU FFN with biases, LayerNorm, learned positions.

mlx-lm has no OPT, so this compact model file follows mlx-lm's layout (ModelArgs with Hugging Face
names, a KV cache per layer); its `mlp` is swapped for the flash FFN like every other architecture.
Weights use Hugging Face names without the `decoder.` level: model.layers.N.self_attn.q_proj.weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask, scaled_dot_product_attention

POSITION_OFFSET = 2  # OPT's learned positions start at index 2 (a fairseq legacy)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    ffn_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True

    def __post_init__(self):
        if self.word_embed_proj_dim not in (None, self.hidden_size) or not self.do_layer_norm_before:
            raise ValueError("OPT variants with project_in/out or post-norm layers (opt-350m) are not supported")


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, self.heads = args.hidden_size, args.num_attention_heads
        self.scale = (d // self.heads) ** -0.5
        self.q_proj = nn.Linear(d, d, bias=args.enable_bias)
        self.k_proj = nn.Linear(d, d, bias=args.enable_bias)
        self.v_proj = nn.Linear(d, d, bias=args.enable_bias)
        self.out_proj = nn.Linear(d, d, bias=args.enable_bias)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        # (B, L, d) -> (B, heads, L, head_dim)
        q, k, v = (
            p(x).reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """fc1 -> ReLU -> fc2; stands in only until the flash FFN replaces it."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.hidden_size, args.ffn_dim)
        self.fc2 = nn.Linear(args.ffn_dim, args.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.relu(self.fc1(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.self_attn_layer_norm = nn.LayerNorm(args.hidden_size)
        self.final_layer_norm = nn.LayerNorm(args.hidden_size)
        self.mlp = MLP(args)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = x + self.self_attn(self.self_attn_layer_norm(x), mask, cache)
        return h + self.mlp(self.final_layer_norm(h))


class OPTModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.embed_positions = nn.Embedding(args.max_position_embeddings + POSITION_OFFSET, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.final_layer_norm = nn.LayerNorm(args.hidden_size)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        offset = cache[0].offset if cache and cache[0] is not None else 0
        positions = mx.arange(offset, offset + inputs.shape[1]) + POSITION_OFFSET
        h = self.embed_tokens(inputs) + self.embed_positions(positions)
        cache = cache or [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.final_layer_norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args, self.model_type = args, args.model_type
        self.model = OPTModel(args)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        return self.model.embed_tokens.as_linear(self.model(inputs, cache))  # the head is tied

    def sanitize(self, weights: dict) -> dict:
        """Hugging Face names -> ours: drop `decoder.`, fc1/fc2 become the FFN, the tied head goes."""
        out = {}
        for k, v in weights.items():
            k = k.replace("model.decoder.", "model.")
            if k.startswith("lm_head."):
                continue
            out[k.replace(".fc1.", ".mlp.fc1.").replace(".fc2.", ".mlp.fc2.")] = v
        return out

    @property
    def layers(self):
        return self.model.layers
