import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    """A real, temporary Prefect API for every flow test (one per session: it takes seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    # its default deadline, 30 s, is too short on a loaded machine
    with prefect_test_harness(server_startup_timeout=300):
        yield
