"""The Prefect flow's own rules, without a server: one run per working tree, and what a second run does."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny import tiny_tree

from flows.lfdm_flow import LOCK, WorkingTreeBusy, lfdm, stage_logs_to_prefect, working_tree_lock
from lfdm.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_a_second_run_in_a_locked_working_tree_does_nothing(tmp_path, monkeypatch):
    # a run that got past the lock would fail on these params
    (tmp_path / "params.yaml").write_text("not: [valid params\n")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from pathlib import Path; from flows.lfdm_flow import working_tree_lock as lock\n"
            f"with lock(Path({str(tmp_path)!r})):\n    print('held', flush=True); import time; time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        monkeypatch.chdir(tmp_path)  # the flow changes into project_dir; this is undone after the test
        with pytest.raises(WorkingTreeBusy, match=rf"another lfdm flow run \(pid {holder.pid}\)"):
            lfdm.fn(project_dir=str(tmp_path), set_params={"seed": 1})
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "params.yaml").read_text() == "not: [valid params\n"  # set_params came after the lock
    deadline = time.monotonic() + 10
    while True:  # the system drops a killed holder's lock
        try:
            with working_tree_lock(tmp_path):
                break
        except WorkingTreeBusy:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert (tmp_path / LOCK).is_file()


def test_stage_logs_go_to_the_run_only_while_the_flow_runs(caplog):
    """Inside the flow the ``lfdm`` logger feeds Prefect's run logger alone; outside it logs as it did (a
    caplog test after an imported flow still sees lfdm's records)."""
    logger = logging.getLogger("lfdm.training")
    with stage_logs_to_prefect():
        assert not logging.getLogger("lfdm").propagate
        logger.info("inside")  # no run here: the handler drops it, and it does not reach the root
    with caplog.at_level(logging.INFO, logger="lfdm"):
        logger.info("outside")
    assert [r.getMessage() for r in caplog.records if r.name == "lfdm.training"] == ["outside"]


def test_dask_without_its_extra_stops_before_any_stage_naming_the_extra(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_tree({"parallel": {"dask": True}})))
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "flows.dask_shards", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"parallel\.dask: true needs prefect-dask .*'\.\[dask\]'"):
        lfdm.fn(project_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dvc", "params.yaml"]  # no stage wrote anything
