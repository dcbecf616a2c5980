"""The budget each mode gets, resolved once with the runtime planner's parser and model size.

A synthetic bundle written with --layers N < the real depth records the real depth (config
"synthetic.full_layers"); the budget is then resolved for the full-depth model and scaled per layer
(embeddings, head and one layer's block, the prompt/streaming buffer, counted once), so per-layer
figures match the full model's.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxflash.format.bundle import Bundle
from mlxflash.runtime.planner import model_bytes, parse_memory
from mlxflash.runtime.reorder import group_size


@dataclass
class Budget:
    layers: int  # in this bundle
    full_layers: int  # of the real model (the budget is resolved at this depth)
    fixed_bytes: int  # resident bytes outside the layers (embeddings, head, final norm)
    once_bytes: int  # one layer's FFN block: the prompt/streaming buffer every mode holds once
    layer_resident_bytes: float  # attention, norms, biases: per layer (predictors excluded)
    layer_ffn_bytes: float
    model_bytes_full: float
    budget_full: float
    ffn_allowance: float  # FFN DRAM per layer the budget leaves
    budget: float  # this bundle's budget (the full one scaled per layer)

    @property
    def model_bytes(self) -> float:
        return self.fixed_bytes + self.layers * (self.layer_resident_bytes + self.layer_ffn_bytes)

    @property
    def scaled(self) -> bool:
        return self.full_layers != self.layers


def resolve_budget(bundle: Bundle, memory: str) -> Budget:
    """`memory` ('50%' of the model, '4GB', ...) parsed by the planner, at the model's real depth."""
    weights = bundle.resident_weights()  # lazy: only shapes are read
    layers = bundle.num_layers
    in_layers = sum(v.nbytes for k, v in weights.items() if k.startswith("model.layers.") and ".predictor." not in k)
    resident = model_bytes(bundle) - bundle.spec.ffn_weight_bytes  # the planner's model size, predictors excluded
    fixed = resident - in_layers
    full = max(layers, int(bundle.config.get("synthetic", {}).get("full_layers", layers)))
    per_res, per_ffn = in_layers / layers, bundle.spec.ffn_weight_bytes / layers
    once = max(bundle.spec.block_bytes(i) for i in range(layers))
    model_full = fixed + full * (per_res + per_ffn)
    budget_full = float(parse_memory(memory, int(model_full)))
    allowance = max(0.0, (budget_full - fixed - once - full * per_res) / full)
    budget = min(budget_full, fixed + once + layers * (per_res + allowance))
    return Budget(layers, full, fixed, once, per_res, per_ffn, model_full, budget_full, allowance, budget)


def hybrid_keep(bundle: Bundle, budget: Budget) -> list[int]:
    """Per layer, the first neurons the FFN allowance holds resident (whole quantization groups)."""
    R = bundle.spec.record.nbytes
    g = group_size(bundle)
    k = int(budget.ffn_allowance // R) // g * g
    return [min(k, b.neurons) for b in bundle.spec.layers]
