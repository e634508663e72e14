import pytest

pytest_plugins = ["tests.s3server"]


@pytest.fixture
def ckdir(tmp_path):
    d = tmp_path / "ckpt"
    return d
