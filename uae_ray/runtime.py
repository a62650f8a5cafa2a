"""Ray start-up and the run directory.

The run directory holds every stage's output under fixed names (see :mod:`uae_ray.data.schema`). It is a local path
or any URI that ``pyarrow.fs`` understands (``s3://bucket/run``, ``gs://...``), so a cluster job writes to shared
storage. Writes are atomic: a table is written under a temporary name and renamed (local) or written as one object
(object stores, whose PUT is atomic); a directory (a model) is complete only once its ``_SUCCESS`` marker exists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger("uae_ray")

SUCCESS_MARKER = "_SUCCESS"

#: Variables handed on to Ray workers when the driver has them. Object-store *locations* travel (endpoint, region),
#: credentials never do: every node takes those from its own environment (instance profile, IRSA, a Secret).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def worker_env_vars() -> dict[str, str]:
    """Environment every Ray worker gets: offline hub (the embedded models need none), quiet tokenizers, and the
    object-store location variables of :data:`FORWARDED_ENV` that the driver has."""
    env = {
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
    }
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    return env


_TEMP = ".tmp-"  # every local write goes to ".<name>.tmp-<id>" beside its target, then is renamed into place


def _temp_path(parent: str, name: str) -> str:
    """A fresh temp path in ``parent`` for the file ``name`` (hidden: readers of the directory skip it)."""
    return f"{parent}/.{name.rsplit('/', 1)[-1]}{_TEMP}{uuid.uuid4().hex[:8]}"


class RunDir:
    """A run directory on a local disk or an object store, with atomic writes.

    Args:
        uri: local path (relative paths are made absolute) or a ``pyarrow.fs`` URI.
    """

    def __init__(self, uri: str | os.PathLike[str]) -> None:
        text = os.fspath(uri)
        if "://" not in text:
            text = str(Path(text).expanduser().resolve())
            Path(text).mkdir(parents=True, exist_ok=True)
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self.root = text
        else:
            self.fs, self.root = pafs.FileSystem.from_uri(text)
            self.fs.create_dir(self.root, recursive=True)
        self.uri = text
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    # ---------------------------------------------------------------- paths
    def path(self, name: str) -> str:
        """Filesystem path (for ``self.fs``) of ``name`` inside the run directory."""
        return f"{self.root.rstrip('/')}/{name}"

    def local_path(self, name: str) -> Path:
        """Local path of ``name``; only for a local run directory."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not a local directory; use fetch_dir() for {name}")
        return Path(self.path(name))

    def exists(self, name: str) -> bool:
        info = self.fs.get_file_info(self.path(name))
        return info.type != pafs.FileType.NotFound

    def dir_complete(self, name: str) -> bool:
        """True when directory ``name`` was fully written (its ``_SUCCESS`` marker exists)."""
        return self.exists(f"{name}/{SUCCESS_MARKER}")

    def listdir(self, name: str) -> list[str]:
        """Base names of the entries of directory ``name`` (empty when it does not exist)."""
        if not self.exists(name):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(name), recursive=False))
        return sorted(i.base_name for i in infos)

    # ---------------------------------------------------------------- tables
    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """Read a Parquet file or a directory of Parquet parts; the error names the missing stage output."""
        if not self.exists(name):
            raise FileNotFoundError(f"{self.path(name)} not found: run the stage that writes {name} first")
        return pq.read_table(self.path(name), columns=columns, filesystem=self.fs)

    def write_table(self, name: str, table: pa.Table) -> None:
        """Write ``table`` to ``name`` atomically: readers see the old file or the whole new one."""
        final = self.path(name)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if not self.is_local:
            pq.write_table(table, final, filesystem=self.fs)
            return
        tmp = _temp_path(parent, name)
        try:
            pq.write_table(table, tmp, filesystem=self.fs)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    # ---------------------------------------------------------------- json / text
    def write_text(self, name: str, text: str) -> None:
        final = self.path(name)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if not self.is_local:
            with self.fs.open_output_stream(final) as f:
                f.write(text.encode("utf-8"))
            return
        tmp = _temp_path(parent, name)
        Path(tmp).write_text(text, encoding="utf-8")
        os.replace(tmp, final)

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read().decode("utf-8")

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_text(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        final = self.path(name)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if not self.is_local:
            with self.fs.open_output_stream(final) as f:
                f.write(data)
            return
        tmp = _temp_path(parent, name)
        Path(tmp).write_bytes(data)
        os.replace(tmp, final)

    # ---------------------------------------------------------------- directories (models, indexes)
    @contextlib.contextmanager
    def staged_dir(self, name: str) -> Iterator[Path]:
        """Yield a local scratch directory; on success it becomes ``name`` (with ``_SUCCESS``), else is discarded.

        Local run dirs: the scratch dir sits beside the target and is renamed into place (replacing an older
        incomplete one). Object stores: files are uploaded, then the marker last.
        """
        if self.is_local:
            final = self.local_path(name)
            final.parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TEMP}", dir=final.parent))
        else:
            scratch = Path(tempfile.mkdtemp(prefix="uae_ray_stage-"))
        try:
            yield scratch
            (scratch / SUCCESS_MARKER).write_text(f"ok {uuid.uuid4().hex}\n")  # unique: names this version
            if self.is_local:
                if final.exists():
                    shutil.rmtree(final)
                os.replace(scratch, final)
            else:
                self._upload_dir(scratch, name)
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)

    def _upload_dir(self, local: Path, name: str) -> None:
        if self.exists(name):  # an older version: its marker goes first (readers see "incomplete", never a mix)
            if self.exists(f"{name}/{SUCCESS_MARKER}"):
                self.fs.delete_file(self.path(f"{name}/{SUCCESS_MARKER}"))
            self.remove(name)
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != SUCCESS_MARKER)
        for p in files:
            rel = p.relative_to(local).as_posix()
            self.fs.create_dir(self.path(f"{name}/{rel}").rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(p), self.path(f"{name}/{rel}"), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        marker = (local / SUCCESS_MARKER).read_text() if (local / SUCCESS_MARKER).exists() else "ok\n"
        self.write_text(f"{name}/{SUCCESS_MARKER}", marker)

    def fetch_dir(self, name: str, cache_root: str | os.PathLike[str] | None = None) -> Path:
        """A local copy of complete directory ``name`` (the directory itself for a local run dir).

        Object stores: copied once per node into ``cache_root`` (default: the temp dir), keyed by the directory's
        path and its ``_SUCCESS`` marker (unique per save), so a model saved again is fetched again. The copy
        lands under a temporary name and is renamed into place, so actors fetching at once never see half a copy.
        """
        if not self.dir_complete(name):
            raise FileNotFoundError(f"{self.path(name)} is missing or incomplete (no {SUCCESS_MARKER})")
        if self.is_local:
            return self.local_path(name)
        version = f"{self.path(name)}@{self.read_text(f'{name}/{SUCCESS_MARKER}').strip()}"
        root = Path(cache_root or tempfile.gettempdir()) / "uae_ray_fetch" / uuid.uuid5(uuid.NAMESPACE_URL, version).hex
        if not (root / SUCCESS_MARKER).exists():
            root.parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{root.name}{_TEMP}", dir=root.parent))
            try:
                pafs.copy_files(self.path(name), str(scratch), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
                try:
                    os.replace(scratch, root)
                except OSError:  # another process on this node finished the same copy first
                    if not (root / SUCCESS_MARKER).exists():
                        raise
            finally:
                if scratch.exists():
                    shutil.rmtree(scratch, ignore_errors=True)
        return root

    def remove_stale_temps(self, name: str) -> int:
        """Remove what a killed writer left in directory ``name``: its ``.<file>.tmp-<id>`` files (every write here
        goes to a fresh temp name, then is renamed, so a temp file that outlives its writer is never output; readers
        skip dot files). Call it where no other writer works in ``name``. Returns how many were removed."""
        stale = [n for n in self.listdir(name) if n.startswith(".") and _TEMP in n]
        for n in stale:
            self.remove(f"{name}/{n}")
        return len(stale)

    def remove(self, name: str) -> None:
        p = self.path(name)
        info = self.fs.get_file_info(p)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(p)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(p)


# ------------------------------------------------------------------------------------------------------------- Ray
def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to a running Ray cluster, or start a local one sized to this machine.

    Which one: ``address`` (``auto``, ``host:port``, ``ray://``) if given, else ``RAY_ADDRESS`` if set (the Job API
    sets it in a job's driver), else a new local cluster with ``num_cpus`` (default: all cores). A running cluster
    is never asked for ``num_cpus``: its nodes say what they have, so passing one there is an error.

    The runtime environment sets the worker env vars; a ``ray://`` client also ships the ``uae_ray`` package so
    workers import the same code as the driver (``ray job submit --working-dir .`` does this for jobs).
    """
    import ray

    if ray.is_initialized():
        return
    runtime_env: dict[str, Any] = {"env_vars": worker_env_vars()}
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
        return
    if num_cpus is not None:
        raise ValueError(f"--num-cpus sizes a new local cluster; this run connects to the cluster at {address!r}, "
                         "whose nodes declare their own CPUs: drop --num-cpus")
    if address.startswith("ray://"):
        import uae_ray

        runtime_env["py_modules"] = [str(Path(uae_ray.__file__).parent)]
    ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)


def ensure_ray() -> None:
    """Start a local cluster unless Ray is already up (stages call this; the CLI connects first)."""
    init_ray(None)
