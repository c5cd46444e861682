"""Weight-only int8 for the text encoder, with torchao (the optional extra `kvray[int8]`).

Every `nn.Linear` weight becomes int8 with one scale per output row (torchao's `Int8WeightOnlyConfig`);
the token embedding, the norms and the activations stay in the network's dtype (bfloat16). The
Flan-UL2 encoder's linear layers are all but 131M of its 8.7B parameters: 35 GB in fp32, about 9 GB so.
torchao is imported only when int8 is asked for (importing it takes about a second).
"""

from __future__ import annotations

from torch import nn


def int8_weight_only(module: nn.Module) -> nn.Module:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        raise RuntimeError("weight-only int8 needs torchao: pip install 'kvray[int8]'") from err
    quantize_(module, Int8WeightOnlyConfig())
    return module
