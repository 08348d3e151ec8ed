"""fewclip_tutorial: few-shot adaptation of CLIP-style models, as a tested package.

The package behind the fewclip-tutorial Jupyter Book.  Each method has a
functional core (tensors in, tensors out) in :mod:`fewclip_tutorial.methods`
and a thin runner registered with :mod:`fewclip_tutorial.methods.registry`;
one episode is :mod:`fewclip_tutorial.episode`, the course tools :mod:`fewclip_tutorial.course`.

The embedded default is ``shapeworld`` (a generated image world, see
:mod:`fewclip_tutorial.data.shapeworld`) with ``shapeworld-tiny`` (a small
open_clip CLIP pretrained on it and shipped in ``fewclip_tutorial/assets``).
"""

__version__ = "0.1.0"

DEFAULT_DATASET = "shapeworld"
DEFAULT_BACKBONE = "shapeworld-tiny"

__all__ = ["__version__", "DEFAULT_DATASET", "DEFAULT_BACKBONE"]
