import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it: starting Ray costs seconds each time."""
    import ray
    from ray import serve

    from cluster.launch import ACTOR_ENV

    ray.init(num_cpus=8, include_dashboard=False, object_store_memory=512 * 1024**2, logging_level="warning",
             runtime_env={"env_vars": ACTOR_ENV})
    yield
    if ray.is_initialized():  # the multi-node tests, run last, stop this Ray for their own
        serve.shutdown()
        ray.shutdown()


def pytest_collection_modifyitems(items):
    """The multi-node tests last: they stop the session's Ray and start a simulated cluster of their own."""
    items.sort(key=lambda item: item.get_closest_marker("multinode") is not None)

