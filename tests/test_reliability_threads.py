"""Issue 15, category 7: under torchrun on CPU each process uses at most its share of the cores, even when
OMP_NUM_THREADS is set for the whole machine, and rank 0 logs the threads chosen."""

import os
import subprocess
import sys

import pytest
import torch

from mu.train.distributed import cpu_thread_share


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_whole_machine_threads_are_cut_to_the_share(monkeypatch, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    torch.set_num_threads(8)
    note = cpu_thread_share(2)
    assert torch.get_num_threads() == 4
    assert note.startswith("cpu threads: 4 per process (2 processes on 8 cores") and "OMP_NUM_THREADS=8" in note
    torch.set_num_threads(8)
    cpu_thread_share(16)  # more processes than cores: one thread each
    assert torch.get_num_threads() == 1


def test_a_smaller_setting_is_kept_and_the_log_says_how_to_use_every_core(monkeypatch, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets when OMP_NUM_THREADS is unset
    torch.set_num_threads(1)
    note = cpu_thread_share(2)
    assert torch.get_num_threads() == 1 and "set OMP_NUM_THREADS=4 to use every core" in note


def test_torchrun_processes_take_their_share(tmp_path):
    """Two real processes under torchrun with OMP_NUM_THREADS = every core: each ends with cores // 2 threads."""
    script = tmp_path / "probe.py"
    script.write_text("import pathlib, sys, torch\nfrom mu.train.distributed import init_distributed, shutdown\n"
                      "env = init_distributed('cpu')\n"
                      "pathlib.Path(sys.argv[1], f'rank{env.rank}').write_text(str(torch.get_num_threads()))\n"
                      "shutdown(env)\n")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = {**os.environ, "OMP_NUM_THREADS": str(cores)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    share = max(1, cores // 2)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == [str(share), str(share)]
    assert p.stderr.count(f"cpu threads: {share} per process (2 processes on {cores} cores") == 1  # rank 0 only
