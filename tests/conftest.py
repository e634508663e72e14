import pytest

pytest_plugins = ["tests.harness.s3"]


@pytest.fixture
def ckdir(tmp_path):
    d = tmp_path / "ckpt"
    return d
