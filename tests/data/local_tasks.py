"""Datasets of the local lm-eval tasks in this folder (used by tests/test_evaluate.py).

Each task YAML names a JSONL file next to this module in ``dataset_kwargs``;
``load`` reads it with the ``json`` builder of Hugging Face ``datasets``: no
download, whatever the working directory.
"""

import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load(data_files: str, **_metadata):
    """A DatasetDict with one "test" split: the JSONL file ``data_files`` of this folder."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": os.path.join(HERE, data_files)})
