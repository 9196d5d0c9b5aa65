"""Weights & Biases and MLflow sinks of the metrics stream (:mod:`spach.train.metrics`), each an optional extra.

Both record the run's resolved configuration (``cfg.checkpoint_args()``, the dict checkpoints keep) as the run's
config / params, per-step scalars under ``step/`` at the global optimizer step and per-epoch stats at the same
step axis with ``epoch`` among them (as Lightning logs them), and continue the run a checkpoint names.
"""
import functools
import logging
import netrc
import os
import queue
import tempfile
import threading
import time
from typing import Optional

from ..errors import SpachError

__all__ = ["WandbSink", "MlflowSink", "require_wandb", "require_mlflow", "WANDB_INSTALL", "MLFLOW_INSTALL"]

WANDB_INSTALL = "--log-wandb needs the wandb package: pip install 'spach[wandb]'"
MLFLOW_INSTALL = "--mlflow-uri needs the mlflow package: pip install 'spach[mlflow]'"


def require_wandb():
    try:
        import wandb  # noqa: F401 - only whether it imports
    except ImportError:
        raise SpachError(WANDB_INSTALL) from None


def require_mlflow():
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise SpachError(MLFLOW_INSTALL) from None


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; otherwise online with an API key and offline without one, so that a cluster
    without internet (or without a login) keeps its runs on disk for ``wandb sync``."""
    return os.environ.get("WANDB_MODE") or ("online" if _has_wandb_key() else "offline")


class WandbSink:
    name, key = "Weights & Biases", "wandb"  # key: its entry in the checkpoint's "tracking"

    def __init__(self, cfg, run_id: Optional[str] = None):
        require_wandb()
        import wandb
        out = cfg.output
        tags = [t for t in out.wandb_tags.split(",") if t.strip()] if out.wandb_tags else None
        self._run = wandb.init(
            project=out.wandb_project, name=out.wandb_name or None, tags=tags, config=cfg.checkpoint_args(),
            dir=out.output_dir or None, id=run_id, resume="allow" if run_id else None, mode=wandb_mode(),
            settings=wandb.Settings(console="off", silent=True))  # the log is spach's own; no second copy
        self.run_id = self._run.id
        # the step axis of every chart is the global optimizer step, which carries on across a resume
        self._run.define_metric("global_step")
        self._run.define_metric("*", step_metric="global_step")

    def log_step(self, step, metrics):
        self._run.log({**{f"step/{k}": v for k, v in metrics.items()}, "global_step": step})

    def log_epoch(self, epoch, step, metrics):
        self._run.log({**{k.replace("_", "/", 1) if k.startswith(("train_", "test_")) else k: v
                          for k, v in metrics.items()}, "epoch": epoch, "global_step": step})

    def close(self, failed=False):
        self._run.finish(exit_code=1 if failed else 0)


class MlflowSink:
    """Talks to the tracking server through :class:`mlflow.MlflowClient` (no global active run, so nothing
    else in the process can log into this run by accident). The run is created (or reopened) on the training
    thread, so a server that is down is known before the first epoch; metrics and artifacts then go out in order
    from one sender thread, so that a step never waits for an HTTP round trip (or a best.pth upload)."""
    name, key = "MLflow", "mlflow"

    def __init__(self, cfg, run_id: Optional[str] = None):
        require_mlflow()
        # a tracking server that is down must not stall training for minutes: mlflow retries each request with
        # back-off by default; a few quick tries, then the sink gives up (the user's own settings win)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        # each retry would print its own urllib3 warning: a failing sink is the fan-out's one line
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        from mlflow import MlflowClient
        from mlflow.entities import Param
        out = cfg.output
        self._client = client = MlflowClient(tracking_uri=out.mlflow_uri)
        self._log_best = out.mlflow_log_best
        if run_id:
            client.get_run(run_id)  # a run the server does not know is a warning (the fan-out's), not a new run
            client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            experiment = client.get_experiment_by_name(out.mlflow_experiment)
            exp_id = experiment.experiment_id if experiment else client.create_experiment(out.mlflow_experiment)
            self.run_id = client.create_run(exp_id, run_name=out.mlflow_run_name or None).info.run_id
            # params are write-once in MLflow: recorded when the run is created (a resume keeps them)
            params = [Param(k, str(v)[:6000]) for k, v in sorted(cfg.checkpoint_args().items())]
            for i in range(0, len(params), 100):  # the server takes at most 100 params per batch
                client.log_batch(self.run_id, params=params[i:i + 100])
        self._queue, self._error = queue.Queue(maxsize=1000), None
        self._thread = threading.Thread(target=self._send, name="spach-mlflow", daemon=True)
        self._thread.start()

    def _submit(self, job):
        """Queue ``job`` for the sender thread: the training loop never waits on the server. The first error
        the thread met surfaces here, on the training thread, where the fan-out reports it once."""
        if self._error is not None:
            raise self._error
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise RuntimeError(f"the server at {self._client.tracking_uri} does not keep up "
                               f"({self._queue.maxsize} logging calls waiting)") from None

    def _send(self):
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:  # after an error the rest is dropped: the sink is being switched off
                try:
                    job()
                except Exception as e:  # noqa: BLE001 - handed to the training thread by _submit / close
                    self._error = e

    def _log(self, step, metrics):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        self._submit(lambda: self._client.log_batch(self.run_id, metrics=batch))

    def log_step(self, step, metrics):
        self._log(step, {f"step/{k}": v for k, v in metrics.items()})

    def log_epoch(self, epoch, step, metrics):
        self._log(step, {**{k.replace("_", "/", 1) if k.startswith(("train_", "test_")) else k: v
                            for k, v in metrics.items()}, "epoch": epoch})

    def log_artifacts(self, paths):
        for path in paths:
            if os.path.basename(path) == "best.pth" and not self._log_best:
                continue
            # log.txt and config.yaml are rewritten by the next epoch: the upload takes a copy of them now
            self._submit(functools.partial(self._upload, path, open(path, "rb").read()
                                           if os.path.basename(path) != "best.pth" else None))

    def _upload(self, path, content):
        if content is None:  # best.pth: a new best.pth is only written through a rename, so the file is whole
            self._client.log_artifact(self.run_id, path)
            return
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, os.path.basename(path))
            with open(copy, "wb") as f:
                f.write(content)
            self._client.log_artifact(self.run_id, copy)

    def close(self, failed=False):
        self._queue.put(None)
        self._thread.join(timeout=120)
        if self._thread.is_alive():
            raise TimeoutError("the last metrics were still being sent after 2 minutes")
        if self._error is not None and not failed:
            raise self._error
        self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
