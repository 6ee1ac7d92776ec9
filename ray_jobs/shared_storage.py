"""Pre-flight for a multi-node Ray cluster: does every node see a folder (or file) as the driver does?

A job's workers may run on any node, and they read and write plain paths: preprocessing tasks
write the dataset's Parquet files, Ray Train's rank 0 writes checkpoints (and, with the default
local MLflow store, logs to ``<output>/mlflow.db``), Tune's trials write their results, and the
workers of training, tuning and inference read the dataset and the checkpoint. A path that
exists on every node but is each node's own disk gives no error where it is written: the
outputs land on the wrong machine, and the job may even exit 0 with an incomplete result. These
checks refuse such a path before any work starts (see docs/cluster.md, "What must be shared
storage and why").

- :func:`check_shared` (an output folder): the driver writes a probe file with a random token
  under the folder and a zero-CPU task pinned to every alive node
  (``NodeAffinitySchedulingStrategy(soft=False)``) reads it; the probe is removed afterwards.
- :func:`check_visible` (an input file that must exist, e.g. ``dataset.json``): the same,
  comparing every node's SHA-256 of the file with the driver's, without writing anything.

Both are no-ops, costing one GCS query, on a single-node Ray (a laptop, CI) and for a URI
(``s3://``, ``gs://``, ...: every node reaches the same store by construction). A node that
reads something else, nothing, or does not answer within ``timeout_s`` fails the check with a
:class:`SharedStorageError` naming the path, the nodes and the fix. Nodes the autoscaler adds
later are not checked; the driver-side check of preprocessing's files
(``igconda.data.build``) and Ray Train's own storage check still cover them.

Ray must be initialised (the jobs call these right after ``ray.init``).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlparse

from igconda.data.io import DATASET_INFO, dataset_info_path

#: Probe files are named ``<PROBE_PREFIX><token>`` (hidden, and removed after the check).
PROBE_PREFIX = ".igconda-shared-probe-"
#: What to do about it; every error ends with this.
FIX = ("Every Ray node must see it at the same path: put it on storage mounted on all nodes "
       "(NFS/EFS, e.g. /mnt/igconda) or, where the option takes one, give an s3:// URI; see "
       "docs/cluster.md, \"What must be shared storage and why\"")


class SharedStorageError(RuntimeError):
    """A path a job's workers use is not the same on every node of the Ray cluster."""


def is_uri(path: str | Path) -> bool:
    """True for a store every node reaches by URI (``s3://``, ``gs://``, ...); not ``file://``."""
    scheme = urlparse(str(path)).scheme
    return bool(scheme) and scheme != "file" and "://" in str(path)


def _local(path: str | Path) -> Path:
    text = str(path)
    return Path(urlparse(text).path if text.startswith("file://") else text).expanduser().absolute()


def read_bytes(path: str) -> bytes | None:
    """What a node sees at ``path``: the file's bytes, or None when it cannot read it."""
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def _node_digest(path: str, read: Callable[[str], bytes | None]) -> tuple[str, str | None]:
    """The task run on each node: (the node it ran on, SHA-256 of what ``read`` returns, or None)."""
    import ray

    data = read(path)
    return (ray.get_runtime_context().get_node_id(),
            None if data is None else hashlib.sha256(data).hexdigest())


def _alive_nodes() -> dict[str, str]:
    """Alive nodes: node id -> IP address."""
    import ray

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}


def _node_views(path: Path, nodes: dict[str, str], read: Callable[[str], bytes | None],
                timeout_s: float) -> dict[str, str | None]:
    """Run :func:`_node_digest` on every node; per node its digest, or an error text."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(_node_digest)  # zero CPUs: not queued behind busy ones
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote(str(path), read): node for node in nodes}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    views: dict[str, str | None] = {}
    for ref in ready:
        node = refs[ref]
        try:
            ran_on, views[node] = ray.get(ref)
        except ray.exceptions.RayError as err:
            last = (str(err).strip().splitlines() or [""])[-1][:200]  # a task's traceback ends with it
            views[node] = f"error: the check failed there ({type(err).__name__}: {last})"
            continue
        if ran_on != node:  # cannot happen with soft=False; a check that did not check is no pass
            views[node] = f"error: the check ran on node {ran_on[:12]} instead"
    for ref in late:
        ray.cancel(ref, force=True)
        views[refs[ref]] = f"error: did not answer within {timeout_s:g} s"
    return views


def _check_nodes(path: Path, digest: str, what: str, nodes: dict[str, str], seen: str,
                 read: Callable[[str], bytes | None], timeout_s: float) -> list[str]:
    views = _node_views(path, nodes, read, timeout_s)
    bad = {node: view for node, view in views.items() if view != digest}
    if bad:
        lines = "; ".join(
            f"{nodes[node]} (node {node[:12]}): "
            + (view[len("error: "):] if view and view.startswith("error: ") else
               "sees no such file" if view is None else "sees different content")
            for node, view in sorted(bad.items(), key=lambda kv: nodes[kv[0]]))
        raise SharedStorageError(
            f"{what} ({path}) is not shared: {len(bad)} of {len(nodes)} Ray node(s) cannot see "
            f"{seen} the driver sees there: {lines}. {FIX}")
    return sorted(views)


def check_shared(folder: str | Path, what: str, *, read: Callable[[str], bytes | None] = read_bytes,
                 timeout_s: float = 120.0) -> list[str]:
    """Refuse an output folder that not every alive Ray node sees (see the module docstring).

    Args:
        folder: the output folder (created if missing), a local path or a URI (not checked).
        what: what it is, for the error (e.g. ``"the training's --output"``).
        read: how a node reads the probe (default :func:`read_bytes`; tests stand in a node
            whose disk is not the driver's).
        timeout_s: how long to wait for every node's answer.

    Returns:
        The ids of the nodes checked; empty when skipped (a URI, or a single node).

    Raises:
        SharedStorageError: some node read another content, nothing, or did not answer.
    """
    nodes = {} if is_uri(folder) else _alive_nodes()
    if len(nodes) < 2:
        return []
    folder = _local(folder)
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = folder / f"{PROBE_PREFIX}{token}"
    probe.write_text(token)
    try:
        return _check_nodes(probe, hashlib.sha256(token.encode()).hexdigest(), what, nodes,
                            "the probe file", read, timeout_s)
    finally:
        probe.unlink(missing_ok=True)


def check_visible(file: str | Path, what: str, *, read: Callable[[str], bytes | None] = read_bytes,
                  timeout_s: float = 120.0) -> list[str]:
    """Refuse an input file that not every alive Ray node sees with the driver's content.

    For inputs the workers read (a dataset's ``dataset.json``, a checkpoint's
    ``metadata.json``): a node without the file, or with another copy at the same path, fails.
    Nothing is written. Arguments, return value and errors as :func:`check_shared`; a file the
    driver itself cannot read is not checked (the job's own error says it is missing).
    """
    nodes = {} if is_uri(file) else _alive_nodes()
    if len(nodes) < 2:
        return []
    file = _local(file)
    data = read_bytes(str(file))
    if data is None:
        return []
    return _check_nodes(file, hashlib.sha256(data).hexdigest(), what, nodes, "the file", read,
                        timeout_s)


def preflight(*, outputs: Mapping[str, str | Path | None] | None = None, data: str | Path | None = None,
              checkpoints: Mapping[str, str | Path | None] | None = None) -> None:
    """The checks a job runs before its work, for what its workers write and read.

    Args:
        outputs: folders workers write, by what they are (for the message): :func:`check_shared`.
        data: a dataset folder workers read: :func:`check_visible` of its ``dataset.json``.
        checkpoints: checkpoint folders workers load, by what they are: :func:`check_visible`
            of each one's ``metadata.json`` (epoch, validation loss, run ids: two trainings' copies
            differ).

    None values are skipped. Raises :class:`SharedStorageError` as those do.
    """
    from igconda.checkpoint import METADATA_FILE

    for what, folder in (outputs or {}).items():
        if folder is not None:
            check_shared(folder, what)
    if data is not None and not is_uri(data):
        check_visible(dataset_info_path(data), f"--data {data} (its {DATASET_INFO})")
    for what, folder in (checkpoints or {}).items():
        if folder is not None and not is_uri(folder):
            check_visible(Path(folder) / METADATA_FILE, f"{what} (its {METADATA_FILE})")
