"""Datasets, prompt templates and few-shot splits.

>>> from fewclip_tutorial.data import load_dataset, make_few_shot
>>> spec = load_dataset("shapeworld")                       # doctest: +SKIP
>>> episode = make_few_shot(spec, shots=16, seed=1)          # doctest: +SKIP
"""

from fewclip_tutorial.data.base import DatasetSpec, LabeledSplit, ListSplit, SubsetSplit
from fewclip_tutorial.data.imagefolder import EmptyImageFolderError, FileListSplit, load_imagefolder
from fewclip_tutorial.data.registry import UnknownDatasetError, list_datasets, load_dataset
from fewclip_tutorial.data.splits import (
    FewShotSplits,
    NotEnoughExamplesError,
    few_shot_indices,
    make_few_shot,
    stratified_split,
)
from fewclip_tutorial.data.templates import (
    DATASET_TEMPLATES,
    DEFAULT_TEMPLATES,
    IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
    TIP_ADAPTER_TEMPLATES,
    format_prompts,
    get_templates,
)
from fewclip_tutorial.data.torchvision_datasets import (
    ConcatSplit,
    DatasetDownloadError,
    DatasetNotFoundError,
    TorchvisionSplit,
    default_data_root,
)

__all__ = [
    "DATASET_TEMPLATES",
    "DEFAULT_TEMPLATES",
    "IMAGENET_TEMPLATES",
    "SIMPLE_IMAGENET_TEMPLATES",
    "TIP_ADAPTER_TEMPLATES",
    "ConcatSplit",
    "DatasetDownloadError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "EmptyImageFolderError",
    "FewShotSplits",
    "FileListSplit",
    "LabeledSplit",
    "ListSplit",
    "NotEnoughExamplesError",
    "SubsetSplit",
    "TorchvisionSplit",
    "UnknownDatasetError",
    "default_data_root",
    "few_shot_indices",
    "format_prompts",
    "get_templates",
    "list_datasets",
    "load_dataset",
    "load_imagefolder",
    "make_few_shot",
    "stratified_split",
]
