import pytest


@pytest.fixture
def ckdir(tmp_path):
    d = tmp_path / "ckpt"
    return d
