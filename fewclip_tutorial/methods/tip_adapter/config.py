"""The options of ``tip-adapter`` and ``tip-adapter-f``, declared once.

The command line, :func:`~fewclip_tutorial.methods.registry.run_method` and the runners
read them here (:func:`~fewclip_tutorial.methods.registry.config_options`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fewclip_tutorial.methods.registry import option

__all__ = ["TipAdapterConfig", "TipAdapterFConfig"]


@dataclass(frozen=True)
class TipAdapterConfig:
    """Training-free Tip-Adapter: cache model, alpha/beta searched on the few-shot val split.

    The cache's views and the authors' ``search_hp`` grid.
    """

    views: int = option(10, "augmented views per training image averaged into a cache key")
    beta_scale: float = option(7.0, "beta grid scale: authors' grid 0.1 + i*(scale-0.1)/steps")
    alpha_scale: float = option(3.0, "alpha grid scale: authors' grid 0.1 + i*(scale-0.1)/steps")
    beta_steps: int = option(200, "number of betas in the search grid")
    alpha_steps: int = option(20, "number of alphas in the search grid")


@dataclass(frozen=True)
class TipAdapterFConfig(TipAdapterConfig):
    """Tip-Adapter-F: fine-tune the cache keys; kept step and alpha/beta chosen on val.

    The search's options plus training (see ``train_tip_adapter_f``).
    """

    epochs: int = option(20, "training epochs (authors: 20; 100 for EuroSAT)")
    min_steps: int = option(100, "at least this many optimiser steps (small training sets)")
    lr: float = option(1e-3, "AdamW learning rate (eps 1e-4, cosine schedule per step)")
    batch_size: int = option(256, "mini-batch size (capped at the training-set size)")
