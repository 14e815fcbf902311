"""What the running job is doing, as ``GET /sdapi/v1/progress`` reports it (AUTOMATIC1111's ``shared.state``).

One :class:`ProgressState` per server, written by the worker thread and read by request handlers under a lock.
"""

from __future__ import annotations

import datetime
import threading
import time
from typing import Any


class ProgressState:
    """The running job's state, thread-safe.

    Attributes (read them through :meth:`snapshot`):
        job: kind of the running job (``"txt2img"``, ``"img2img"``, ``"load model"``), ``""`` when idle.
        job_count, job_no: batches (``n_iter``) of the job and the index of the running one.
        sampling_step, sampling_steps: U-Net evaluations done in this batch and in all.
        interrupted, skipped: an interrupt / skip was asked for the running job.
        current_image: base64 PNG preview of the latest latents (see :meth:`want_preview`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._preview_wanted = threading.Event()
        self._reset()

    def _reset(self) -> None:
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.interrupted = False
        self.skipped = False
        self.job_timestamp = "0"
        self.time_start = 0.0
        self.current_image: str | None = None
        self.preview_step = 0
        self.textinfo: str | None = None

    # ----- written by the worker ---------------------------------------------------------------------------------
    def begin(self, job: str, job_count: int, sampling_steps: int) -> str:
        """Start a job; returns its timestamp (``YYYYmmddHHMMSS``, A1111's ``job_timestamp``)."""
        with self._lock:
            self._reset()
            self.job, self.job_count, self.sampling_steps = job, job_count, sampling_steps
            self.time_start = time.time()
            self.job_timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
            self.textinfo = f"{job}: starting"
            return self.job_timestamp

    def next_batch(self, job_no: int) -> None:
        """Batch ``job_no`` (0-based) of the running job starts."""
        with self._lock:
            self.job_no, self.sampling_step = job_no, 0

    def step(self, done: int) -> None:
        """``done`` U-Net evaluations of the running batch are finished."""
        with self._lock:
            self.sampling_step = done
            self.textinfo = (f"{self.job}: batch {self.job_no + 1}/{self.job_count}, "
                             f"step {done}/{self.sampling_steps}")

    def set_preview(self, png_b64: str, step: int) -> None:
        """Store the preview made after ``step`` evaluations."""
        with self._lock:
            self.current_image, self.preview_step = png_b64, step

    def end(self) -> None:
        """The job is over (done, failed or interrupted): back to idle."""
        with self._lock:
            self._reset()

    # ----- asked by clients --------------------------------------------------------------------------------------
    def interrupt(self) -> bool:
        """Ask the running job to stop at its next step; returns whether a job was running."""
        with self._lock:
            if self.job_count == 0:
                return False
            self.interrupted = True
            return True

    def skip(self) -> bool:
        """Ask the running job to drop its current batch and go on with the next; returns whether one ran."""
        with self._lock:
            if self.job_count == 0:
                return False
            self.skipped = True
            return True

    def take_skip(self) -> bool:
        """Whether a skip was asked (and clear it, so the next batch runs)."""
        with self._lock:
            was, self.skipped = self.skipped, False
            return was

    def want_preview(self) -> None:
        """A client wants ``current_image``: the worker decodes one at its next step."""
        self._preview_wanted.set()

    def preview_wanted(self) -> bool:
        """Whether a client asked for a preview since the last one was made (and clear the request)."""
        if self._preview_wanted.is_set():
            self._preview_wanted.clear()
            return True
        return False

    def is_interrupted(self) -> bool:
        """Whether an interrupt was asked for the running job."""
        with self._lock:
            return self.interrupted

    def snapshot(self, skip_current_image: bool = False) -> dict[str, Any]:
        """The A1111 ``ProgressResponse``: ``progress`` (0..1), ``eta_relative`` (seconds), ``state``,
        ``current_image`` (base64 PNG or ``None``) and ``textinfo``, computed as A1111 does (0.01 plus the share
        of finished batches plus the share of the running one's steps; ETA from the elapsed time)."""
        with self._lock:
            state = {"skipped": self.skipped, "interrupted": self.interrupted, "stopping_generation": False,
                     "job": self.job, "job_count": self.job_count, "job_timestamp": self.job_timestamp,
                     "job_no": self.job_no, "sampling_step": self.sampling_step,
                     "sampling_steps": self.sampling_steps}
            if self.job_count == 0:
                return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                        "textinfo": self.textinfo}
            progress = 0.01 + self.job_no / self.job_count
            if self.sampling_steps > 0:
                progress += self.sampling_step / self.sampling_steps / self.job_count
            elapsed = time.time() - self.time_start
            eta_relative = elapsed / progress - elapsed
            return {"progress": min(progress, 1.0), "eta_relative": eta_relative, "state": state,
                    "current_image": None if skip_current_image else self.current_image,
                    "textinfo": self.textinfo}
