import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    """A real, temporary Prefect API for every flow test (one per session: it takes seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    # a generous deadline: Prefect's 30 s default times out on the loaded shared machine
    with prefect_test_harness(server_startup_timeout=120):
        yield
