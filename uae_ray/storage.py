"""The run directory: a local path or an object store, one commit protocol, one writer at a time.

Where it lives: a local path (every node must see the same disk) or any URI that ``pyarrow.fs`` understands
(``s3://bucket/prefix``, ``gs://...``). S3-compatible stores (AWS S3, MinIO, Ceph RGW, moto) take their endpoint from
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) or from :class:`StorageOptions` (the config file's ``storage``
section), which are folded into the URI's query (``?endpoint_override=...&scheme=http&region=...``) so that every Ray
worker that rebuilds the run directory from ``run_dir.uri`` reaches the same store. Credentials never go into the URI,
a config or a log: pyarrow's S3 client takes them from each node's own environment (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, instance profiles, IRSA), and a pickled filesystem carries none.

**Commit protocol** (what readers may trust):

- *One object* (a table, a JSON report, a labeling part): local disk writes a hidden temp file beside the target and
  renames it into place; an object store writes the object with one PUT (single-part or multipart, both visible only
  once complete). Readers see the old object or the whole new one, never part of one.
- *A directory* (a model, an index version) is many objects, and object stores have no rename. It is written under
  a fresh version: locally a hidden scratch directory that is atomically *exchanged* with the old one
  (``renameat2(RENAME_EXCHANGE)``), so ``<name>/`` is at every instant either the whole old or the whole new
  directory, and the old one is deleted only after; on an object store the files go under ``<name>/v-<version>/``
  and then one small **commit record** ``<name>/_SUCCESS`` (JSON: version, every file's size and sha256) is
  written. Readers trust only the version the commit record names and verify each fetched file's size and hash
  against it; versions no record names are garbage (removed after the next commit). The old version stays readable
  until the new one is committed.
- *A writer*: :meth:`RunDir.lease` grants one writer at a time (conditional create on local disk, a heartbeat object
  on object stores, which have no conditional create through pyarrow); a second writer is refused with a message
  naming the holder. Temp files carry their writer's id: stale-temp clean-up never touches this writer's own, and
  removes other writers' only under the lease (or once older than the lease timeout, or their process is gone).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger("uae_ray")

SUCCESS_MARKER = "_SUCCESS"
LEASE_FILE = "_lease.json"
LEASE_TIMEOUT_S = 60.0  # a lease whose heartbeat is older than this may be taken over (--take-over-lease)
LEASE_HEARTBEAT_S = 10.0
_TEMP = ".tmp-"  # a local write goes to ".<name>.tmp-<writer>-<rand>" beside its target, then is renamed into place
_VERSION_PREFIX = "v-"
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class StorageOptions:
    """Where an S3-compatible run directory lives, beside its URI (no credentials here, ever).

    Args:
        endpoint_url: ``http(s)://host:port`` of the store (MinIO, Ceph, moto); None: ``AWS_ENDPOINT_URL`` or AWS.
        region: the bucket's region; None: ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` or the SDK's default.
        path_style: path-style addressing (``host/bucket/key``), what MinIO and most on-premise stores need;
            False: virtual-hosted style (``bucket.host/key``).
    """

    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool = True


def resolve_uri(uri: str, options: StorageOptions | None = None) -> str:
    """``uri`` with the object-store location folded into its query, so a worker rebuilding it reaches the same
    store. Local paths come back absolute; query options already in ``uri`` win over ``options`` and the env."""
    if "://" not in uri:
        return str(Path(uri).expanduser().resolve())
    parts = urlsplit(uri)
    if parts.scheme != "s3":
        return uri
    opts = options or StorageOptions()
    query = dict(parse_qsl(parts.query))
    endpoint = opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_override" not in query:
        ep = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        query["endpoint_override"] = ep.netloc
        query.setdefault("scheme", ep.scheme or "https")
    region = opts.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        query.setdefault("region", region)
    if not opts.path_style:
        query.setdefault("force_virtual_addressing", "true")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(sorted(query.items())), ""))


def display_uri(uri: str) -> str:
    """``uri`` without its query (for messages and paths shown to people)."""
    return uri.split("?", 1)[0]


def writer_id() -> str:
    """This process's id in temp-file names: its lease token's prefix once it holds a lease, else host+pid."""
    return _WRITER["id"] or f"{socket.gethostname()[:12]}-{os.getpid()}"


_WRITER: dict[str, str | None] = {"id": None}


def _temp_path(parent: str, name: str) -> str:
    """A fresh temp path in ``parent`` for the file ``name`` (hidden: readers of the directory skip it)."""
    return f"{parent}/.{name.rsplit('/', 1)[-1]}{_TEMP}{writer_id()}-{uuid.uuid4().hex[:8]}"


def _temp_writer(name: str) -> str | None:
    """The writer id inside a temp name made by :func:`_temp_path` (None: not a temp name)."""
    if not name.startswith(".") or _TEMP not in name:
        return None
    return name.split(_TEMP, 1)[1].rsplit("-", 1)[0]


def _sha256_stream(f: Any) -> str:
    """Hex SHA-256 of a binary stream, read in chunks."""
    h = hashlib.sha256()
    while chunk := f.read(_HASH_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a local file, read in chunks."""
    with open(path, "rb") as f:
        return _sha256_stream(f)


def file_sha256(path: Path) -> str:
    """:func:`sha256_file` of a local file, read once per process while its (resolved path, size, mtime) stay the
    same: freshness checks stamp inputs by content, and a step's check and its run both stamp them."""
    st = path.stat()
    return _sha256_once(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _sha256_once(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def _file_manifest(root: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file under ``root`` but the commit record."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != SUCCESS_MARKER)
    return {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


# ------------------------------------------------------------------------------------------------------------ lease
class LeaseHeldError(RuntimeError):
    """Another writer holds the run directory's lease (the message names it and says what to do)."""


class LeaseLostError(RuntimeError):
    """This writer's lease was taken over by another writer: it must stop writing."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_text(rec: dict[str, Any], now: float) -> str:
    job = f", job {rec['job_id']}" if rec.get("job_id") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(rec.get("started", 0))))
    age = now - float(rec.get("heartbeat", 0))
    return f"host {rec.get('host')!r} pid {rec.get('pid')}{job} ({rec.get('command', '?')}), since {since}, " \
           f"last heartbeat {age:.0f} s ago"


class Lease:
    """One writer's hold on a run directory, kept alive by a heartbeat thread; see :meth:`RunDir.lease`."""

    def __init__(self, run_dir: RunDir, token: str, record: dict[str, Any], heartbeat_s: float) -> None:
        self.run_dir, self.token, self.record = run_dir, token, record
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="uae-ray-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if another writer took the lease over (writes are fenced by this)."""
        if self.lost:
            raise LeaseLostError(self.lost)

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                rec = self.run_dir._read_lease()
                if rec is None or rec.get("token") != self.token:
                    holder = _holder_text(rec, time.time()) if rec else "nobody"
                    self.lost = f"{self.run_dir.display} lease was taken over (now held by {holder}): stop writing"
                    log.error("%s", self.lost)
                    return
                self.record = {**self.record, "heartbeat": time.time()}
                self.run_dir._put_lease(self.record)
            except Exception as e:  # a store hiccup: try again next beat; the lease only expires after the timeout
                log.warning("lease heartbeat on %s failed (%s); retrying", self.run_dir.display, e)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.lost:
            return
        with contextlib.suppress(Exception):
            rec = self.run_dir._read_lease()
            if rec is not None and rec.get("token") == self.token:
                self.run_dir.fs.delete_file(self.run_dir.path(LEASE_FILE))


# --------------------------------------------------------------------------------------------------------- run dir
class RunDir:
    """A run directory on a local disk or an object store, with atomic writes (see the module docstring).

    Args:
        uri: local path (relative paths are made absolute) or a ``pyarrow.fs`` URI.
        options: object-store location (endpoint, region, addressing), folded into ``uri``.
    """

    def __init__(self, uri: str | os.PathLike[str], options: StorageOptions | None = None) -> None:
        text = resolve_uri(os.fspath(uri), options)
        if "://" not in text:
            Path(text).mkdir(parents=True, exist_ok=True)
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self.root = text
        else:
            self.fs, self.root = pafs.FileSystem.from_uri(text)
            self.fs.create_dir(self.root, recursive=True)
        self.uri = text  # rebuilds the same run directory on any worker: RunDir(run_dir.uri)
        self.display = display_uri(text)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self.active_lease: Lease | None = None

    def __repr__(self) -> str:
        return f"RunDir({self.display!r})"

    # ---------------------------------------------------------------- paths
    def path(self, name: str) -> str:
        """Filesystem path (for ``self.fs``) of ``name`` inside the run directory."""
        return f"{self.root.rstrip('/')}/{name}"

    def local_path(self, name: str) -> Path:
        """Local path of ``name``; only for a local run directory."""
        if not self.is_local:
            raise ValueError(f"{self.display} is not a local directory; use fetch_dir() for {name}")
        return Path(self.path(name))

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    def dir_complete(self, name: str) -> bool:
        """True when directory ``name`` has a committed version (its ``_SUCCESS`` commit record exists)."""
        return self.exists(f"{name}/{SUCCESS_MARKER}")

    def listdir(self, name: str) -> list[str]:
        """Base names of the entries of directory ``name`` (empty when it does not exist)."""
        if not self.exists(name):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(name), recursive=False))
        return sorted(i.base_name for i in infos)

    def _fence(self) -> None:
        if self.active_lease is not None:
            self.active_lease.check()

    # ---------------------------------------------------------------- single objects
    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """Read a Parquet file or a directory of Parquet parts; the error names the missing stage output."""
        if not self.exists(name):
            raise FileNotFoundError(f"{self.path(name)} not found: run the stage that writes {name} first")
        return pq.read_table(self.path(name), columns=columns, filesystem=self.fs)

    def write_table(self, name: str, table: pa.Table) -> None:
        """Write ``table`` to ``name`` atomically: readers see the old file or the whole new one."""
        self._put(name, lambda target: pq.write_table(table, target, filesystem=self.fs))

    def write_bytes(self, name: str, data: bytes) -> None:
        def put(target: str) -> None:
            with self.fs.open_output_stream(target) as f:
                f.write(data)

        self._put(name, put)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def _put(self, name: str, write: Any) -> None:
        """One object, atomically: a local temp file renamed into place, or one object-store PUT."""
        self._fence()
        final = self.path(name)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if not self.is_local:
            write(final)
            return
        tmp = _temp_path(parent, name)
        try:
            write(tmp)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read().decode("utf-8")

    def sha256(self, name: str) -> str:
        """Hex SHA-256 of file ``name`` (streamed in chunks from the local disk or the object store)."""
        with self.fs.open_input_stream(self.path(name)) as f:
            return _sha256_stream(f)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_text(name))

    # ---------------------------------------------------------------- directories (models, index versions)
    @contextlib.contextmanager
    def staged_dir(self, name: str) -> Iterator[Path]:
        """Yield a local scratch directory; on success it becomes the committed version of ``name``, else it is
        discarded and the previous version stays. See the module docstring for the protocol."""
        self._fence()
        if self.is_local:
            final = self.local_path(name)
            final.parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TEMP}{writer_id()}-", dir=final.parent))
        else:
            scratch = Path(tempfile.mkdtemp(prefix="uae_ray_stage-"))
        try:
            yield scratch
            self._fence()
            version = uuid.uuid4().hex[:16]
            record = {"version": version, "committed": time.time(), "files": _file_manifest(scratch)}
            if self.is_local:
                (scratch / SUCCESS_MARKER).write_text(json.dumps(record, indent=1) + "\n")
                self._swap_local(scratch, final)
            else:
                self._commit_remote(scratch, name, record)
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)

    @staticmethod
    def _swap_local(scratch: Path, final: Path) -> None:
        """Make ``scratch`` the directory ``final``; the old one (if any) is whole until the swap, then deleted."""
        if final.exists() and _exchange(scratch, final):
            return  # ``scratch`` now holds the old version; the caller deletes it
        if final.exists():  # no renameat2 here: move the old one aside first (a reader may briefly see no dir)
            aside = final.with_name(f".{final.name}{_TEMP}{writer_id()}-old{uuid.uuid4().hex[:6]}")
            os.replace(final, aside)
            os.replace(scratch, final)
            shutil.rmtree(aside, ignore_errors=True)
            return
        os.replace(scratch, final)

    def _commit_remote(self, local: Path, name: str, record: dict[str, Any]) -> None:
        """Upload ``local`` as version ``record['version']`` of ``name``, then the commit record, then drop the
        versions no record names."""
        prefix = f"{name}/{_VERSION_PREFIX}{record['version']}"
        for rel in record["files"]:
            target = self.path(f"{prefix}/{rel}")
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(local / rel), target, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        self.write_json(f"{name}/{SUCCESS_MARKER}", record)  # the commit point
        for entry in self.listdir(name):
            if entry.startswith(_VERSION_PREFIX) and entry != f"{_VERSION_PREFIX}{record['version']}":
                self.remove(f"{name}/{entry}")
            elif entry not in (SUCCESS_MARKER,) and not entry.startswith(_VERSION_PREFIX):
                self.remove(f"{name}/{entry}")  # files of a directory written before versions existed

    def commit_record(self, name: str) -> dict[str, Any]:
        """The commit record of directory ``name`` (legacy plain-text markers give ``{"version": <text>}``)."""
        text = self.read_text(f"{name}/{SUCCESS_MARKER}")
        try:
            rec = json.loads(text)
        except json.JSONDecodeError:
            rec = None
        return rec if isinstance(rec, dict) and "version" in rec else {"version": text.strip(), "files": None}

    def fetch_dir(self, name: str, cache_root: str | os.PathLike[str] | None = None) -> Path:
        """A local copy of the committed version of directory ``name`` (the directory itself when local).

        Object stores: copied once per node into ``cache_root`` (default: the temp dir), keyed by the directory's
        path and committed version; every file's size and sha256 are checked against the commit record; the copy
        lands under a temporary name and is renamed into place, so actors fetching at once never see half a copy.
        A version replaced while it was being fetched is fetched again at the new version (once).
        """
        if not self.dir_complete(name):
            raise FileNotFoundError(f"{self.path(name)} is missing or incomplete (no {SUCCESS_MARKER})")
        if self.is_local:
            return self.local_path(name)
        for attempt in range(2):
            record = self.commit_record(name)
            key = f"{self.display.rstrip('/')}/{name}@{record['version']}"
            root = Path(cache_root or tempfile.gettempdir()) / "uae_ray_fetch" / uuid.uuid5(uuid.NAMESPACE_URL, key).hex
            if (root / SUCCESS_MARKER).exists():
                return root
            try:
                self._fetch_version(name, record, root)
                return root
            except (FileNotFoundError, OSError, ValueError) as e:
                if attempt or self.commit_record(name)["version"] == record["version"]:
                    raise
                log.info("%s was replaced while fetching (%s); fetching the new version", self.path(name), e)
        raise AssertionError("unreachable")

    def _fetch_version(self, name: str, record: dict[str, Any], root: Path) -> None:
        root.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{root.name}{_TEMP}", dir=root.parent))
        try:
            files = record.get("files")
            if files is None:  # a directory committed before versions existed: its files sit beside the marker
                pafs.copy_files(self.path(name), str(scratch), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
            else:
                src = self.path(f"{name}/{_VERSION_PREFIX}{record['version']}")
                for rel, meta in files.items():
                    dest = scratch / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    pafs.copy_files(f"{src}/{rel}", str(dest), source_filesystem=self.fs,
                                    destination_filesystem=pafs.LocalFileSystem())
                    if dest.stat().st_size != meta["size"] or sha256_file(dest) != meta["sha256"]:
                        raise ValueError(f"{src}/{rel}: size or sha256 differs from its commit record")
                (scratch / SUCCESS_MARKER).write_text(json.dumps(record) + "\n")
            try:
                os.replace(scratch, root)
            except OSError:  # another process on this node finished the same copy first
                if not (root / SUCCESS_MARKER).exists():
                    raise
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)

    # ---------------------------------------------------------------- clean-up
    def remove_stale_temps(self, name: str) -> int:
        """Remove the temp files and scratch directories that *other* writers left in directory ``name`` (a write
        goes to a fresh ``.<file>.tmp-<writer>-<id>`` and is renamed, so a temp that outlives its writer is never
        output). This writer's own temps are never touched. Another writer's are removed when this RunDir holds the
        lease (no other writer may write now: a fenced one's late rename simply fails), else only when they are
        older than the lease timeout or their process (this host) is gone. Returns how many were removed."""
        me, now, stale = writer_id(), time.time(), 0
        leased = self.active_lease is not None
        for n in self.listdir(name):
            who = _temp_writer(n)
            if who is None or who == me:
                continue
            info = self.fs.get_file_info(self.path(f"{name}/{n}"))
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            if leased or now - mtime >= LEASE_TIMEOUT_S or self._writer_dead(who):
                self.remove(f"{name}/{n}")
                stale += 1
        return stale

    @staticmethod
    def _writer_dead(who: str) -> bool:
        """True when ``who`` is a host+pid writer id of this host whose process is gone."""
        host, _, pid = who.rpartition("-")
        return host == socket.gethostname()[:12] and pid.isdigit() and not _pid_alive(int(pid))

    def remove(self, name: str) -> None:
        self._fence()
        p = self.path(name)
        info = self.fs.get_file_info(p)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(p)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(p)

    # ---------------------------------------------------------------- lease
    def _read_lease(self) -> dict[str, Any] | None:
        try:
            rec = json.loads(self.read_text(LEASE_FILE))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        except OSError:
            if not self.exists(LEASE_FILE):
                return None
            raise
        return rec if isinstance(rec, dict) else None

    def _put_lease(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, indent=1) + "\n").encode()
        if not self.is_local:
            with self.fs.open_output_stream(self.path(LEASE_FILE)) as f:
                f.write(data)
            return
        tmp = _temp_path(self.root, LEASE_FILE)
        Path(tmp).write_bytes(data)
        os.replace(tmp, self.path(LEASE_FILE))

    def _create_lease_local(self, record: dict[str, Any]) -> bool:
        """Conditional create (O_EXCL): True when this call created the lease file."""
        try:
            fd = os.open(self.path(LEASE_FILE), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record, indent=1) + "\n")
        return True

    def _expire_holder(self, rec: dict[str, Any], take_over: bool, timeout_s: float) -> str:
        """Decide about the current holder: returns why it may be replaced, or raises LeaseHeldError."""
        now = time.time()
        age = now - float(rec.get("heartbeat", 0))
        same_host_dead = rec.get("host") == socket.gethostname() and not _pid_alive(int(rec.get("pid", -1)))
        if same_host_dead:
            return "its process is gone (this host)"
        if age >= timeout_s and take_over:
            return f"its heartbeat is {age:.0f} s old (--take-over-lease)"
        hint = ("its heartbeat is older than the timeout: rerun with --take-over-lease if that writer is gone"
                if age >= timeout_s else f"wait for it to finish (a lease expires {timeout_s:.0f} s after its "
                                         "last heartbeat)")
        raise LeaseHeldError(f"{self.display} is being written by {_holder_text(rec, now)}: {hint}")

    @contextlib.contextmanager
    def lease(self, *, take_over: bool = False, command: str = "uae-ray", timeout_s: float = LEASE_TIMEOUT_S,
              heartbeat_s: float = LEASE_HEARTBEAT_S, settle_s: float = 0.5) -> Iterator[Lease]:
        """Hold the run directory's single-writer lease for the ``with`` block.

        Local disk: the lease file is created with ``O_EXCL`` (exactly one creator wins). Object stores: read the
        lease object, write ours if none is live, wait ``settle_s`` and read it back (strong read-after-write
        consistency: of two racing writers only the later PUT survives and the other backs off); the heartbeat
        thread rewrites it every ``heartbeat_s`` and notices a take-over, after which every write of this RunDir
        raises :class:`LeaseLostError` (fencing). A holder whose process is gone (same host) is replaced at once;
        one whose heartbeat is older than ``timeout_s`` only with ``take_over``; a live one never.

        Raises:
            LeaseHeldError: another writer holds it; the message names host, pid, job id, command and since when.
        """
        if self.active_lease is not None:  # re-entrant: a stage run inside `uae-ray run` under the same lease
            yield self.active_lease
            return
        now = time.time()
        token = uuid.uuid4().hex
        record = {"token": token, "host": socket.gethostname(), "pid": os.getpid(),
                  "job_id": os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID"),
                  "command": command, "started": now, "heartbeat": now}
        if self.is_local:
            while not self._create_lease_local(record):
                rec = self._read_lease()
                if rec is None:  # released between our create and read: try again
                    continue
                why = self._expire_holder(rec, take_over, timeout_s)
                log.warning("lease on %s: replacing %s: %s", self.display, _holder_text(rec, time.time()), why)
                aside = self.path(f".{LEASE_FILE}{_TEMP}stale-{token[:8]}")
                with contextlib.suppress(FileNotFoundError):  # of two takers only one renames the old file away
                    os.rename(self.path(LEASE_FILE), aside)
                    os.remove(aside)
        else:
            rec = self._read_lease()
            if rec is not None:
                why = self._expire_holder(rec, take_over, timeout_s)
                log.warning("lease on %s: replacing %s: %s", self.display, _holder_text(rec, time.time()), why)
            self._put_lease(record)
            time.sleep(settle_s)
            back = self._read_lease()
            if back is None or back.get("token") != token:
                raise LeaseHeldError(f"{self.display}: another writer took the lease at the same time "
                                     f"({_holder_text(back, time.time()) if back else 'unknown'})")
        lease = Lease(self, token, record, heartbeat_s)
        self.active_lease, _WRITER["id"] = lease, token[:12]
        try:
            yield lease
        finally:
            self.active_lease, _WRITER["id"] = None, None
            lease.release()
