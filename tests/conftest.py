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
    serve.shutdown()
    ray.shutdown()

