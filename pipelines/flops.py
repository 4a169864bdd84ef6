"""Training FLOPs per token, shared by the MFU figure of a run and the capacity planner."""

from __future__ import annotations


def flops_per_token(num_params: int, trainable_params: int, method: str, num_layers: int, hidden_size: int,
                    seq_len: int) -> float:
    """Forward + backward FLOPs for one token.

    Dense weights: 2N forward, 2N for the activation gradients, and 2N more for the weight
    gradients when every weight trains (6N for full fine-tuning, about 4N for LoRA, whose few
    adapter weights add 2 x trainable). Attention scores and values: 12 x layers x hidden x
    sequence length, forward + backward.
    """
    dense = (6 * num_params) if method == "full" else (4 * num_params + 2 * trainable_params)
    return dense + 12 * num_layers * hidden_size * seq_len
