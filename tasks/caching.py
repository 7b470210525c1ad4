"""What makes a stage's cache hit trustworthy: a key from its inputs' fingerprints, parameters and
code version, and a check that the outputs a cached result points at are still there and complete."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State

from neva_core.errors import NevaError, TransientError
from neva_core.fingerprint import cache_key
from neva_core.io import MANIFEST_NAME, sha256_file

log = logging.getLogger(__name__)


@dataclass
class StageCache(CachePolicy):
    """Cache key = stage name + fingerprints of the task's inputs (paths by content) + code version
    (+ the remote version of a download's source).

    `outputs_ok(result)` tells whether the outputs a recorded result points at are still complete.
    When they were deleted or damaged, the task runs again under a fresh key instead of handing
    back paths to nothing.

    Two runs of the same stage at once both miss the cache and both run the task; the stage's own
    output lock (`io.commit_output`) makes the second wait and then reuse what the first wrote. Prefect's
    SERIALIZABLE isolation is not used: its FileSystemLockManager leaves the lock file of a killed run
    behind with no expiry, so the next run would wait forever, while the kernel drops a dead run's lock.
    """

    stage: str = ""
    # Parameters naming where a stage writes: keyed by name only, since their content is the result.
    output_params: tuple[str, ...] = ()
    outputs_ok: Callable[[Any], None] = field(default=lambda result: None)
    remote_version: Callable[[dict[str, Any]], str] | None = None

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        try:
            # A remote source (a Hub repo, a URL) is keyed by what it holds now: its commit or ETag.
            remote = self.remote_version(inputs) if self.remote_version else None
        except NevaError as exc:
            log.warning("%s: cannot read the source's version (%s); running without the cache", self.stage, exc)
            return None
        keyed = {name: str(value) if name in self.output_params else value for name, value in inputs.items()}
        key = cache_key(self.stage, remote=remote, **keyed)
        store = task_ctx.result_store
        if store.exists(key) and not self._still_valid(store.read(key).result):
            return f"{key}-redo-{uuid.uuid4().hex}"
        return key

    def _still_valid(self, result: Any) -> bool:
        try:
            self.outputs_ok(result)
        except (NevaError, OSError, KeyError, TypeError) as exc:
            log.warning("%s: the cached outputs are gone or incomplete (%s); running the stage again", self.stage, exc)
            return False
        return True


def check_same_manifest(folder: Path | str, manifest_sha256: str, what: str) -> None:
    """A cached result's folder still holds what the result describes: its manifest is the recorded one."""
    if sha256_file(Path(folder) / MANIFEST_NAME) != manifest_sha256:
        raise NevaError(f"{folder} now holds another {what} than the one this result describes")


def retry_transient(task: Any, task_run: TaskRun, state: State) -> bool:
    """Retry only failures that a retry can fix (network drops, 5xx); bad input fails at once."""
    return isinstance(state.data, TransientError)
