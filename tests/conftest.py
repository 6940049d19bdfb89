"""Test-session setup shared by every test file.

TRITON_INTERPRET=1 must be set before triton is first imported (it decides at decoration time
whether @triton.jit functions run in the interpreter), so it is set here, at collection start.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_torch_seed():
    """Every test starts from the same global RNG state, so failures reproduce."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The uniform training set of test_train_fixtures (images, records, a tokenizer), once per module.
    A module that needs other records defines its own ``data_dir``."""
    from test_train_fixtures import make_uniform_dataset

    directory = tmp_path_factory.mktemp("uniform_data")
    make_uniform_dataset(directory)
    return directory
