"""One metrics stream, several sinks: TensorBoard, Weights & Biases, MLflow.

The loop hands :class:`Metrics` a step's scalars every ``--log-interval`` optimizer steps (loss, lr, grad norm,
images/s, device memory) and an epoch's stats once per epoch; :class:`Metrics` passes them to every sink it holds.
A sink is anything with ``log_step(step, metrics)``, ``log_epoch(epoch, step, metrics)``, ``close()`` (and,
for trackers whose runs outlive a process, ``run_id``). ``step`` is the number of optimizer steps since the run
started, so it carries on where it stopped when a run is resumed.

Tracking is a side show: a sink that raises (server down, disk full) is reported in one warning line and
dropped, and training goes on. The loop calls the sinks only after the checkpoint of the epoch is written.
"""
import logging
import math
import numbers
import os
from typing import Dict, List, Optional, Protocol

from ..errors import SpachError

__all__ = ["MetricsSink", "Metrics", "TensorBoardSink", "build_metrics", "require_sinks", "scalars"]

logger = logging.getLogger("spach.train")


class MetricsSink(Protocol):
    name: str

    def log_step(self, step: int, metrics: Dict[str, float]) -> None: ...

    def log_epoch(self, epoch: int, step: int, metrics: Dict[str, float]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def scalars(stats: dict) -> Dict[str, float]:
    """The finite real numbers of ``stats`` (booleans and strings left out)."""
    out = {}
    for key, value in stats.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        value = float(value)
        if math.isfinite(value):
            out[key] = value
    return out


class Metrics:
    """The fan-out: every call goes to every live sink; a sink that fails warns once and is dropped."""

    def __init__(self, sinks: List[MetricsSink]):
        self.sinks = list(sinks)

    def __bool__(self):
        return bool(self.sinks)

    def _call(self, sink, call: str, *args):
        try:
            getattr(sink, call)(*args)
        except Exception as e:  # noqa: BLE001 - any failure of a tracker must leave training running
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            logger.warning(f"{sink.name} logging failed and is switched off for the rest of the run "
                           f"(training goes on): {detail}")
            self.sinks.remove(sink)
            if call != "close":
                try:
                    sink.close(True)
                except Exception:  # noqa: BLE001 - already reported once
                    pass

    def _each(self, call: str, *args):
        for sink in list(self.sinks):
            self._call(sink, call, *args)

    def log_step(self, step: int, metrics: dict):
        self._each("log_step", int(step), scalars(metrics))

    def log_epoch(self, epoch: int, step: int, metrics: dict):
        self._each("log_epoch", int(epoch), int(step), scalars(metrics))

    def artifacts(self, paths: List[str]):
        """Files a tracker keeps with the run (config.yaml, log.txt, best.pth), for the sinks that store files."""
        paths = [p for p in paths if os.path.isfile(p)]
        for sink in list(self.sinks):
            if hasattr(sink, "log_artifacts"):
                self._call(sink, "log_artifacts", paths)

    def run_ids(self) -> Dict[str, str]:
        """The trackers' run ids, kept in the checkpoint so that a resumed run continues the same tracked run."""
        return {s.key: s.run_id for s in self.sinks if getattr(s, "run_id", None)}

    def close(self, failed: bool = False):
        """End the tracked runs; ``failed``: the run stopped on an error (trackers mark the run failed)."""
        self._each("close", failed)
        self.sinks = []


class TensorBoardSink:
    """Per-step scalars under ``step/`` at the global step; per-epoch scalars under the tags
    ``spach plot --tensorboard`` writes (``train/loss``, ``test/acc1`` ...) at the epoch."""
    name = "TensorBoard"

    def __init__(self, log_dir: str):
        from ..tb import TensorBoardWriter
        self.writer = TensorBoardWriter(log_dir)

    def log_step(self, step, metrics):
        self.writer.write({f"step_{k}": v for k, v in metrics.items()}, step, flush=False)

    def log_epoch(self, epoch, step, metrics):
        self.writer.write(metrics, epoch)

    def close(self, failed=False):
        self.writer.close()


def require_sinks(out):
    """Fail before any work, in one line naming the extra, when a flag's tracker is not installed."""
    if out.tensorboard:
        from ..tb import require_tensorboard
        require_tensorboard()
    from .trackers import require_mlflow, require_wandb
    if out.log_wandb:
        require_wandb()
    if out.mlflow_uri:
        require_mlflow()


def build_metrics(cfg, save: bool, is_main: bool, run_ids: Optional[Dict[str, str]] = None) -> Metrics:
    """The run's sinks, on the main rank only; ``run_ids``: the tracked runs a resumed checkpoint names."""
    out = cfg.output
    if not is_main:
        return Metrics([])
    run_ids = run_ids or {}
    sinks: List[MetricsSink] = []
    makers = []
    if out.tensorboard and save:
        makers.append(("TensorBoard", lambda: TensorBoardSink(os.path.join(out.output_dir, "tensorboard"))))
    if out.log_wandb:
        from .trackers import WandbSink
        makers.append(("Weights & Biases", lambda: WandbSink(cfg, run_ids.get("wandb"))))
    if out.mlflow_uri:
        from .trackers import MlflowSink
        makers.append(("MLflow", lambda: MlflowSink(cfg, run_ids.get("mlflow"))))
    for name, make in makers:
        try:
            sinks.append(make())
        except SpachError:
            raise
        except Exception as e:  # noqa: BLE001 - a tracker that cannot start must not stop training
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            logger.warning(f"{name} logging could not start and is off for this run (training goes on): {detail}")
    return Metrics(sinks)
