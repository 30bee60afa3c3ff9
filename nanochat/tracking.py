"""Optional experiment tracking: wandb when asked for and available, silence otherwise."""

from __future__ import annotations

from nanochat.common import print0


def add_run_arg(group) -> None:
    group.add_argument("--run", default=None, help="wandb run name; no name, no wandb")


class Tracker:
    """Logs metrics to wandb on the master rank; a no-op everywhere else."""

    def __init__(self, run: str | None, config: dict, is_master: bool, project: str = "nanochat"):
        self.wandb_run = None
        if not run or not is_master:
            return
        try:
            import wandb
        except ImportError:
            print0(f"wandb is not installed; run '{run}' logs to the console only (pip install -e '.[wandb]')")
            return
        # WANDB_MODE=offline/disabled is honoured by wandb.init itself.
        self.wandb_run = wandb.init(project=project, name=run, config=config)

    def log(self, metrics: dict, step: int) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
