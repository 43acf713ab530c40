"""Reaching Ray, and bad input: an unreachable ``--address`` fails in milliseconds with one line, a malformed
one is named, Ray not installed is one line naming the extra; nothing is written in any of these cases."""

from __future__ import annotations

import socket
import time

import pytest

from actsparse.core.errors import ActsparseError
from actsparse.executors.ray_session import RayOptions, check_reachable
from tests.helpers import run_cli


def _dead_port() -> int:
    with socket.socket() as s:  # a loopback port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_an_unreachable_address_is_one_line_in_milliseconds(tmp_path):
    port = _dead_port()
    t0 = time.perf_counter()
    with pytest.raises(ActsparseError, match=rf"^no Ray cluster at 127.0.0.1:{port}: Connection refused$"):
        check_reachable(f"127.0.0.1:{port}", 5)
    assert time.perf_counter() - t0 < 1
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[[jobs]]\nmodel = "smollm2-135m"\ncorpus = "wiki"\n')
    for command in (["collect", "--config", str(jobs), "--store", str(tmp_path / "S")],
                    ["curves", str(tmp_path / "S")], ["index", str(tmp_path / "S")]):
        r = run_cli(*command, "--executor", "ray", "--address", f"127.0.0.1:{port}", timeout=60)
        assert (r.returncode, r.stdout) == (2, ""), r.stderr
        assert r.stderr.strip() == f"error: no Ray cluster at 127.0.0.1:{port}: Connection refused"
    assert not (tmp_path / "S").exists()


@pytest.mark.parametrize("options, message", [
    (dict(address="localhost"), "--address must be auto or HOST:PORT, got 'localhost'"),
    (dict(address="host:0"), "--address must be auto or HOST:PORT, got 'host:0'"),
    (dict(workers=0), "--workers must be at least 1 (got 0)"),
    (dict(gpus_per_worker=-1), "--gpus-per-worker must be >= 0 (got -1)"),
    (dict(device="tpu"), "unknown --device 'tpu' (choose auto, cpu, cuda)"),
    (dict(device="cuda"), "--device cuda on Ray needs --gpus-per-worker > 0"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ActsparseError, match=f"^{__import__('re').escape(message)}"):
        RayOptions(**options).check()


def test_the_device_of_the_workers():
    assert RayOptions().worker_device == "cpu"
    assert RayOptions(gpus_per_worker=1).worker_device == "cuda"
    assert RayOptions(gpus_per_worker=1, device="cpu").worker_device == "cpu"


@pytest.mark.slow
def test_without_ray_the_executor_is_one_line_naming_the_extra(tmp_path, text_corpus):
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = {"PYTHONPATH": str(fake.parent)}
    for command in (["collect", "--model", "smollm2-135m", "--corpus", str(text_corpus), "--store", str(tmp_path / "S")],
                    ["curves", str(tmp_path / "S")], ["index", str(tmp_path / "S")]):
        r = run_cli(*command, "--executor", "ray", env=env, timeout=60)
        assert (r.returncode, r.stdout) == (2, ""), r.stderr
        assert r.stderr.strip() == "error: --executor ray needs Ray, an optional extra: pip install 'actsparse[ray]'"
    assert not (tmp_path / "S").exists()
