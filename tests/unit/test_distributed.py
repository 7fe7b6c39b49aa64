"""``distributed.launch``'s processes meet on 127.0.0.1 only: a real 2-process gloo group, and nothing of it
listens on another address."""

from __future__ import annotations

import json
import sys

import psutil

from lfdm import distributed

WORKER = """
import json, os, sys
import psutil, torch, torch.distributed as dist

if os.environ["RANK"] == os.environ.get("FAIL_RANK"):
    sys.exit(3)
dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
dist.barrier()  # every socket of the group is open
if dist.get_rank() == 0:
    launcher = psutil.Process().parent()
    pids = {launcher.pid, *(p.pid for p in launcher.children())}
    listening = [c.laddr.ip for c in psutil.net_connections("inet") if c.pid in pids and c.status == "LISTEN"]
    with open(sys.argv[1], "w") as out:
        json.dump({"sum": total.item(), "listening": listening}, out)
dist.barrier()
dist.destroy_process_group()
"""


def test_worker_environment_names_the_loopback():
    env = distributed.worker_env(1, 2, 29500)
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "29500"
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("1", "1", "2")
    addresses = {a.address for a in psutil.net_if_addrs()[env["GLOO_SOCKET_IFNAME"]]}
    assert "127.0.0.1" in addresses and env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"]


def test_two_processes_meet_on_the_loopback_only(tmp_path):
    script, report = tmp_path / "worker.py", tmp_path / "report.json"
    script.write_text(WORKER)
    assert distributed.run_workers([sys.executable, str(script), str(report)], 2) is None
    found = json.loads(report.read_text())
    assert found["sum"] == 3.0
    assert found["listening"] and set(found["listening"]) == {"127.0.0.1"}, found  # store and gloo's pairs

    # a process that fails stops the others (rank 0 would wait for rank 1 forever) and is named
    assert distributed.run_workers([sys.executable, str(script), str(report)], 2, {"FAIL_RANK": "1"}) == (
        1,
        3,
    )
