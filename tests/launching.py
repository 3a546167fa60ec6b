"""Helpers for the tests that start several processes (torchrun, accelerate launch)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess

import psutil
import pytest


def free_port() -> str:
    with socket.socket() as probe:  # a fixed port collides with a run that has not let go of it yet
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def launch(command: list[str], env: dict[str, str], timeout: float = 150) -> subprocess.CompletedProcess:
    """Run a multi-process launch; a run that hangs gets SIGABRT on the launcher and every worker, so
    that faulthandler prints each rank's Python stack into the failure instead of a bare timeout.
    torch's elastic agent starts each worker in a session of its own: signalling the launcher's
    process group alone would leave them running and holding the pipes."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env | {"PYTHONFAULTHANDLER": "1"}, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        family = psutil.Process(process.pid).children(recursive=True) + [psutil.Process(process.pid)]
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(signal.SIGABRT)
        psutil.wait_procs(family, timeout=20)
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"the launch hung for {timeout} s; stacks at the abort:\n{stderr[-12000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
