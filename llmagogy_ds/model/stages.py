"""The model of every stage of a curriculum: layouts (with growth origins) and F multipliers,
a pure function of the config and the vocabulary size."""
from __future__ import annotations

from dataclasses import dataclass

from llmagogy_ds.config import CurriculumConfig
from llmagogy_ds.model.generations import multipliers
from llmagogy_ds.model.gpt import GPT
from llmagogy_ds.model.layout import ModelLayout, Shape, stage_layouts


@dataclass
class Plan:
    """Layouts and lr multipliers of every stage (pure function of config + vocab).

    ``per_norm_eps``: a run grown before one-epsilon RMSNorms (``keeps_per_norm_eps(growth.json of
    stage 1)``); its models keep each norm's epsilon in units of its birth width (``layout``)."""

    cfg: CurriculumConfig
    vocab: int
    per_norm_eps: bool = False

    def __post_init__(self):
        st = self.cfg.stages
        shapes = [Shape(s.model.layers, s.model.hidden, s.model.heads, s.model.ffn, s.model.kv_heads) for s in st]
        growth = [None] + [(s.growth.depth, s.growth.placement) for s in st[1:]]
        self.layouts = stage_layouts(shapes, growth, self.vocab, st[0].model.head_dim, self.per_norm_eps)
        self.freezes = [1.0] + [s.freeze.value for s in st[1:]]

    def layout(self, s: int) -> ModelLayout:
        return self.layouts[s][0]

    def multipliers(self, s: int, chosen: dict[tuple[int, int], float] | None = None) -> dict[int, float]:
        return multipliers(self.freezes, s, chosen)

    def model(self, s: int, ops=None) -> GPT:
        m = self.cfg.stages[s].model
        return GPT(self.layout(s), m.seq_len, m.rope_theta, m.norm_eps, **({"ops": ops} if ops else {}))


# growth.json's record of the epsilon rule (written at every growth since one-epsilon norms)
NORM_EPS_KEY, ONE_EPS, PER_NORM_EPS = "norm_eps", "one per model", "per norm"


def keeps_per_norm_eps(first_growth: dict | None) -> bool:
    """Whether a run keeps per-norm epsilons, from its stage 1's ``growth.json`` (None: not
    grown yet, so the one-epsilon rule applies): a growth.json without the key predates it."""
    return first_growth is not None and first_growth.get(NORM_EPS_KEY, PER_NORM_EPS) == PER_NORM_EPS


__all__ = ["Plan", "keeps_per_norm_eps", "NORM_EPS_KEY", "ONE_EPS", "PER_NORM_EPS"]
