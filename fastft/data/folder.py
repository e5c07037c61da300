"""The dataset index moved to `fastft.data.index`; these names stay importable from here until the modules outside
fastft/data that still use this path (train.py, api.py, features.py, benchmarks/) import them from there."""

from fastft.data.index import (
    IMG_EXTENSIONS,
    DatasetIndex,
    Sample,
    index_for_eval,
    index_from_config,
    is_image,
    list_images,
    read_file_list,
    scan_folder,
)

__all__ = [
    "IMG_EXTENSIONS",
    "DatasetIndex",
    "Sample",
    "index_for_eval",
    "index_from_config",
    "is_image",
    "list_images",
    "read_file_list",
    "scan_folder",
]
