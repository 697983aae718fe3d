"""FLOPs accounting against a hand count: frozen generations (F = 0) cost 4·N·T, evaluation 2·N·T."""
import pytest

from llmagogy_ds.model.flops import flops_per_token, forward_flops_per_token, frozen_matmul_params
from llmagogy_ds.model.generations import multipliers
from llmagogy_ds.model.layout import Shape, stage_layouts

T = 32  # seq_len


def test_frozen_generation_counts_4NT_by_hand():
    # 2 -> 3 blocks (one identity block, interleaved), hidden 32 = 4 heads x 8, ffn 48, vocab 97
    layouts = stage_layouts([Shape(2, 32, 4, 48), Shape(3, 32, 4, 48)], [None, ("identity", "interleave")], 97, 8)
    layout = layouts[1][0]
    block = 4 * 32 * 32 + 3 * 48 * 32 + 2 * 32  # q k v o, gate up down, two RMSNorm gains
    gen0 = 2 * block + 32 + 97 * 32  # the old blocks, final norm and LM head (the embedding is no matmul)
    gen1 = block
    attn = 12 * T * 32 * 3  # per token: scores and weighted sum, forward + backward, 3 layers
    assert frozen_matmul_params(layout, multipliers([1.0, 0.0], 1)) == gen0
    assert flops_per_token(layout, T, multipliers([1.0, 0.0], 1)) == 4 * gen0 + 6 * gen1 + attn
    for F in (1.0, 0.5):  # slowed, not frozen: weight gradients are computed
        assert flops_per_token(layout, T, multipliers([1.0, F], 1)) == 6 * (gen0 + gen1) + attn
    assert flops_per_token(layout, T) == 6 * (gen0 + gen1) + attn
    assert forward_flops_per_token(layout, T) == 2 * (gen0 + gen1) + attn / 3
    # frozen share of a final stage: the overstatement 6·N would make
    over = flops_per_token(layout, T) / flops_per_token(layout, T, multipliers([1.0, 0.0], 1)) - 1
    assert over == pytest.approx(2 * gen0 / (4 * gen0 + 6 * gen1 + attn))
