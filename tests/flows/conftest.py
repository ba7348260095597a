import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    """A real, temporary Prefect API for every flow test (one per session: it takes seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    # its 30 s default for the server's start is too short on a loaded 2-core machine (nice 19)
    with prefect_test_harness(server_startup_timeout=180):
        yield
