"""Serve the deployment ``lfdm/full`` from this process (``python -m flows.serve``, from the repository
root), then trigger it with ``prefect deployment run lfdm/full``. One run at a time: a second waits until
the first has finished (and then finds the stages up to date)."""

from pathlib import Path

from flows.lfdm_flow import lfdm

if __name__ == "__main__":
    lfdm.serve(name="full", parameters={"project_dir": str(Path.cwd())}, limit=1)
