"""MLflow tracking for a federation: one run, config as params, every round as metrics.

The round driver calls ``log_round(row)`` after each round. A tracking server that goes
away mid-federation must not end a 100-round run, so every call after ``start()`` logs a
warning and carries on; only ``start()`` (a wrong URI, an unknown run to resume) raises.
Only the configuration goes to params; history rows are logged as numbers only, so no
string from a round (a reason, a file name) can carry patient data into MLflow.
"""

from __future__ import annotations

import copy
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from fedmed.calibration import MEASURE_KEYS
from fedmed.errors import UsageError

__all__ = ["Tracker", "BackgroundTracker", "flatten_config", "round_metrics", "calibration_metrics"]

log = logging.getLogger("fedmed.server.tracking")

RUN_ID_FILE = "mlflow_run_id"
MAX_PARAM_VALUE = 6000          # MLflow's limit on a param value
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _key(name: str) -> str:
    """MLflow keys allow letters, digits, ``_-. /``; anything else (a site named ``a:b``) → ``_``."""
    return _BAD_KEY_CHARS.sub("_", str(name))


def flatten_config(cfg: dict[str, Any], *, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}``; lists joined with ``,``; values cut to 6000 chars."""
    out: dict[str, str] = {}
    for k, v in cfg.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, prefix=f"{name}."))
            continue
        if isinstance(v, (list, tuple)):
            text = ",".join(str(x) for x in v)
        else:
            text = str(v)
        out[_key(name)] = text[:MAX_PARAM_VALUE]
    return out


def round_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of one history row under MLflow metric names (lists and NaN/Inf skipped).

    Top-level scalars keep their key; ``per_site[s][m]`` → ``site.<s>.<m>``;
    ``train_per_site[s][m]`` → ``site.<s>.train_<m>``.
    """
    out: dict[str, float] = {}
    for k, v in row.items():
        if k != "round" and _is_number(v):
            out[_key(k)] = float(v)
    for phase, v in (row.get("timing") or {}).items():
        if _is_number(v):
            out[_key(f"seconds_{phase}")] = float(v)
    for group, fmt in (("per_site", "site.{s}.{m}"), ("train_per_site", "site.{s}.train_{m}")):
        sites = row.get(group)
        if not isinstance(sites, dict):
            continue
        for site, metrics in sites.items():
            if not isinstance(metrics, dict):
                continue
            for m, v in metrics.items():
                if _is_number(v):
                    out[_key(fmt.format(s=site, m=m))] = float(v)
    return out


def calibration_metrics(cal: dict[str, Any] | None) -> dict[str, float]:
    """The numbers of a federation's calibration result (:mod:`fedmed.server.calibration`).

    ``calibration_temperature``; the sites' pooled ``ece_before`` / ``ece_after`` /
    ``nll_before`` / ``nll_after``; ``central_test_<m>``; ``site.<s>.<m>``. Empty without
    a fitted temperature (off, skipped or failed).
    """
    if not cal or not _is_number(cal.get("temperature")):
        return {}
    out = {"calibration_temperature": float(cal["temperature"])}
    groups = [("{m}", cal.get("pooled")), ("central_test_{m}", cal.get("central_test"))]
    groups += [(f"site.{site}.{{m}}", m) for site, m in (cal.get("sites") or {}).items()]
    for fmt, metrics in groups:
        if isinstance(metrics, dict):
            out.update({_key(fmt.format(m=k)): float(metrics[k]) for k in MEASURE_KEYS
                        if _is_number(metrics.get(k))})
    return out


def _chunks(items: list[Any], n: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


class Tracker:
    """One MLflow run per federation, through an explicit ``MlflowClient`` (no global state).

    ``uri`` defaults to ``sqlite:///<out_dir>/mlflow.db`` with artifacts under
    ``<out_dir>/mlartifacts``. ``start()`` resumes ``resume_run_id`` if given, else (with
    ``resume=True``) the run id saved in ``<out_dir>/mlflow_run_id``, else starts a new run.
    """

    def __init__(
        self,
        *,
        uri: str | None,
        experiment: str,
        run_name: str,
        out_dir: Path,
        resume_run_id: str | None = None,
        resume: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.uri = uri or f"sqlite:///{self.out_dir.resolve()}/mlflow.db"
        self.experiment = experiment
        self.run_name = run_name
        self.resume_run_id = resume_run_id
        self.resume = resume
        self.run_id: str | None = None
        self._client: Any = None

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> str:
        """Create or continue the run; returns its id. Raises ``ValueError`` naming the URI."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        run_id = self.resume_run_id
        id_file = self.out_dir / RUN_ID_FILE
        if run_id is None and self.resume and id_file.exists():
            run_id = id_file.read_text().strip() or None
        try:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=self.uri)
            if run_id is not None:
                run = client.get_run(run_id)
                if run.info.status != "RUNNING":
                    client.update_run(run_id, status="RUNNING")
            else:
                exp_id = self._experiment_id(client)
                run = client.create_run(exp_id, run_name=self.run_name,
                                        tags={"fedmed.out_dir": str(self.out_dir.resolve())})
                run_id = run.info.run_id
        except Exception as exc:  # noqa: BLE001 - any backend error becomes one clear message
            what = f"resume run {run_id!r}" if run_id else f"start a run in experiment {self.experiment!r}"
            raise UsageError(f"MLflow tracking at {self.uri!r}: could not {what}: {exc}") from exc
        self._client, self.run_id = client, run_id
        id_file.write_text(run_id + "\n")
        log.info("MLflow run %s at %s", run_id, self.uri)
        return run_id

    def _experiment_id(self, client: Any) -> str:
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        artifacts = None
        if self.uri.startswith("sqlite:"):   # else MLflow puts artifacts under ./mlruns of the cwd
            artifacts = (self.out_dir.resolve() / "mlartifacts").as_uri()
        return client.create_experiment(self.experiment, artifact_location=artifacts)

    def end(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None:
        """Mark the run ended; a warning, not an error, if the server cannot be reached."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, not {status!r}")
        self._safe("end the run", lambda c, r: c.set_terminated(r, status=status))

    # -- logging -------------------------------------------------------------------
    def log_params(self, cfg_dict: dict[str, Any]) -> None:
        """Log the (nested) configuration as flat ``a.b.c`` params — configuration only."""
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten_config(cfg_dict).items()]

        def send(c: Any, r: str) -> None:
            for chunk in _chunks(params, MAX_PARAMS_PER_BATCH):
                c.log_batch(r, params=chunk)

        self._safe("log params", send)

    def log_round(self, row: dict[str, Any]) -> None:
        """Log one history row's numbers at ``step=row["round"]`` in one batch request."""
        from mlflow.entities import Metric

        step = int(row.get("round", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in round_metrics(row).items()]

        def send(c: Any, r: str) -> None:
            for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
                c.log_batch(r, metrics=chunk)

        self._safe(f"log round {step}", send)

    def log_calibration(self, cal: dict[str, Any] | None, *, step: int) -> None:
        """Log :func:`calibration_metrics` at ``step`` (the last round); nothing when empty."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in calibration_metrics(cal).items()]
        if metrics:
            self._safe("log calibration", lambda c, r: c.log_batch(r, metrics=metrics))

    def log_artifacts(self, paths: list[Path]) -> None:
        """Upload files (or folders) such as ``report.html``; missing paths are skipped."""
        def send(c: Any, r: str) -> None:
            for p in map(Path, paths):
                if p.is_dir():
                    c.log_artifacts(r, str(p), artifact_path=p.name)
                elif p.is_file():
                    c.log_artifact(r, str(p))
                else:
                    log.warning("MLflow: artifact %s does not exist; skipped", p)

        self._safe("log artifacts", send)

    def _safe(self, what: str, fn: Any) -> None:
        if self._client is None or self.run_id is None:
            log.warning("MLflow: cannot %s: the tracker was not started", what)
            return
        try:
            fn(self._client, self.run_id)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a federation
            log.warning("MLflow at %s: could not %s (%s: %s); the federation continues",
                        self.uri, what, type(exc).__name__, exc)


class BackgroundTracker:
    """A :class:`Tracker` whose calls run in order on one worker thread, off the rounds' path.

    Why: starting MLflow (its import, creating the sqlite database) took 5-11 s before
    round 1 could start, and every round's log waited for the database (docs/benchmarks.md).
    Here the rounds go on meanwhile; the same calls reach MLflow with the same values, in
    the same order (rows are copied when queued). A failed :meth:`start` (a wrong URI) is
    raised by the next call, so it still stops the federation, after round 1 at the latest;
    :meth:`end` waits until everything queued is logged.
    """

    def __init__(self, tracker: Tracker, *, hold: bool = False) -> None:
        self.tracker = tracker
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="fedmed-tracking", daemon=True)
        self._go = threading.Event()
        if not hold:
            self._go.set()

    def release(self) -> None:
        """Let a ``hold=True`` tracker begin: the calls queued so far, then each as it comes.

        ``hold``: MLflow's start (its import, the database) competes for the coordinator's
        CPU; held, it waits until round 1's messages are out instead of delaying them.
        """
        self._go.set()

    def _work(self) -> None:
        self._go.wait()
        while (job := self._jobs.get()) is not None:
            if self._error is None:  # after a failed start nothing else is sent
                try:
                    job()
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    self._error = exc

    def _submit(self, job: Any) -> None:
        if self._error is not None:
            raise self._error
        self._jobs.put(job)

    def start(self) -> None:
        self._thread.start()
        self._submit(self.tracker.start)

    def log_params(self, cfg_dict: dict[str, Any]) -> None:
        cfg_dict = copy.deepcopy(cfg_dict)
        self._submit(lambda: self.tracker.log_params(cfg_dict))

    def log_round(self, row: dict[str, Any]) -> None:
        row = copy.deepcopy(row)
        self._submit(lambda: self.tracker.log_round(row))

    def log_calibration(self, cal: dict[str, Any] | None, *, step: int) -> None:
        cal = copy.deepcopy(cal)
        self._submit(lambda: self.tracker.log_calibration(cal, step=step))

    def log_artifacts(self, paths: list[Path]) -> None:
        paths = list(paths)
        self._submit(lambda: self.tracker.log_artifacts(paths))

    def end(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None:
        """Log the end and wait for the worker; a start that failed is not raised again here."""
        self._go.set()  # held and never released (the federation failed first): log it now
        if self._thread.is_alive():
            self._jobs.put(lambda: self.tracker.end(status))
            self._jobs.put(None)
            self._thread.join()
