import pytest


@pytest.fixture(scope="session")
def anat():
    from training.simulator.anatomy import load_anatomy

    return load_anatomy()
