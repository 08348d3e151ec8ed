"""Tip-Adapter and Tip-Adapter-F (Zhang et al., "Tip-Adapter: Training-free Adaption of
CLIP for Few-shot Classification", ECCV 2022; code: github.com/gaopengcuhk/Tip-Adapter).

* :mod:`.core`: the cache model, [affinity] and [Tip logits] (tensors in, logits out);
* :mod:`.search`: the grid search of alpha and beta on the validation split;
* :mod:`.train`: Tip-Adapter-F, the cache keys fine-tuned through the one loop;
* :mod:`.config`, :mod:`.runner`: the options and the registered ``tip-adapter`` and
  ``tip-adapter-f`` methods.

The public names of all five are re-exported here.
"""

from fewclip_tutorial.methods.tip_adapter.config import TipAdapterConfig, TipAdapterFConfig
from fewclip_tutorial.methods.tip_adapter.core import (
    CLIP_LOGIT_SCALE,
    TipAdapterError,
    affinity,
    build_cache_keys,
    build_cache_values,
    episode_tensors,
    percent_correct,
    tip_logits,
)
from fewclip_tutorial.methods.tip_adapter.runner import run_tip_adapter, run_tip_adapter_f
from fewclip_tutorial.methods.tip_adapter.search import (
    SearchResult,
    class_sums,
    default_search_grid,
    search_hparams,
    search_hparams_loop,
)
from fewclip_tutorial.methods.tip_adapter.train import (
    TipAdapterF,
    TipAdapterFResult,
    tip_f_steps,
    train_tip_adapter_f,
)

__all__ = [
    "CLIP_LOGIT_SCALE",
    "SearchResult",
    "TipAdapterConfig",
    "TipAdapterError",
    "TipAdapterF",
    "TipAdapterFConfig",
    "TipAdapterFResult",
    "affinity",
    "build_cache_keys",
    "build_cache_values",
    "class_sums",
    "default_search_grid",
    "episode_tensors",
    "percent_correct",
    "run_tip_adapter",
    "run_tip_adapter_f",
    "search_hparams",
    "search_hparams_loop",
    "tip_f_steps",
    "tip_logits",
    "train_tip_adapter_f",
]
