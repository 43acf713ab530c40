"""A real local Ray instance for the executor tests: 2 CPUs, every service on 127.0.0.1, no dashboard, no usage
statistics, one per test session (started on first use, shut down at the end).

Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is imported, so the environment is set here, before any
test imports ray (docs/pitfalls.md P18). The multi-node simulator ``ray.cluster_utils.Cluster`` hangs on these
machines: one instance, and the spread of the work is shown by the workers' PIDs.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.helpers import ROOT

os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
os.environ.pop("RAY_ADDRESS", None)
# Workers inherit the driver's environment, not its sys.path: the tests' own statistics wrapper
# (tests.executors.crash) is imported by module name in the workers.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

CALL_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def ray_local():
    """``ray`` connected to a local instance for the session (a short temp dir: unix sockets take 108 bytes)."""
    import ray

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=200 * 2**20, _temp_dir=temp, log_to_driver=False)
    try:
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
