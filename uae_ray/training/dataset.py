"""Training examples through Ray Data: built from the run directory's Parquet tables, read by Ray Train workers.

The driver never holds the training set (passage texts, pools, labels): it sequences Ray Data and reads back only
small columns (a hash and the skip counts of each query; for the reward model also the queries' split and document).

**Building** (:func:`build_reward_data`, :func:`build_encoder_data`). ``ray.data.read_parquet`` reads the input
tables straight from the run directory (its path and pyarrow filesystem: a local disk or an object store), each row
is tagged with its kind in one long schema, and two hash shuffles bring together what one example needs:

1. by ``pid``: each passage's text meets the rows that refer to it (utility pairs, pool candidates, gold passages);
2. by ``qid``: each query's row meets its text-carrying rows and its teacher scores, and the *same pure builders as
   before* (:func:`~uae_ray.training.data.build_reward_groups`, :func:`~uae_ray.training.data.build_encoder_examples`)
   run on that one query's rows, so skips and hard negatives are decided exactly as they were on the driver.

Small inputs (at most :data:`IN_PROCESS_MAX_BYTES` of Parquet, e.g. the demo's or a test's) are grouped the same way
in the driver's process with pyarrow, running the same per-pid and per-query functions: Ray Data's two hash shuffles
start aggregator actors and cost a fixed ~40 s each on a small cluster (measured: 76 s to build the demo's 1 MB
reward table on two 2-CPU nodes; 5 s in process for a QASPER run dir's 2 MB of 100 papers), which only pays off
once the input is large. The built table is the same either way (``tests/test_training.py`` builds it both ways).

One row per query (the example, or none plus the query's skip counts) is written to ``train_data/<name>/`` in the
run directory: a durable input that survives a lost node or a killed driver, read again by every epoch. Its
``_build.json`` records what it was built from (:func:`build_stamp`): a rerun on unchanged inputs reuses it.

**Training** (:func:`rank_plan`, :func:`rank_batches`). ``TorchTrainer(datasets=..., dataset_config=
DataConfig(datasets_to_split=[]))`` gives every worker the whole example table (materialized once into the object
store) through
``ray.train.get_dataset_shard``. A worker reads the ``qid`` column once (``train_qids``: ids only) and sorts it; an
epoch's order is then the seeded permutation ``default_rng([seed, epoch])`` of those sorted ids, and rank ``r`` takes
the queries at positions ``(step * world + r) * per_worker ...`` of it: the same assignment as before this module
(disjoint queries per rank and step, a global batch of ``queries_per_step x workers``, the last partial global batch
dropped). At each epoch start a worker streams the table once and keeps only the rows of *its own* remaining steps
(memory: its 1/world share of one epoch); a table of at most :data:`CACHE_MAX_BYTES` is streamed once per run and
kept whole in the worker's memory instead (one Ray Data execution, not one per epoch, and the ids read from it).
Either way a run resumed at ``(epoch, step)`` replays exactly the batches it would have run. The order thus depends
only on the seed, the epoch and the set of query ids.

Why not ``streaming_split`` (``datasets_to_split="all"``): it hands blocks to whichever rank has received the fewest
rows so far, so which queries a rank gets follows the table's block sizes and arrival order; ``preserve_order``
makes that repeatable only while the block layout is, and read parallelism follows the cluster's CPUs, which change
when a node is lost and the group restarts. The price of the choice here: every worker streams the whole table
(not 1/world of it) once per epoch; rows of other ranks are dropped as they pass.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from uae_ray.data.schema import CANDIDATES, CORPUS, QUERIES, UTILITIES
from uae_ray.runtime import RunDir
from uae_ray.training.data import (
    EncoderExample,
    RewardGroup,
    build_encoder_examples,
    build_reward_groups,
    epoch_permutation,
)

TRAIN_DATA = "train_data"  # run-dir directory of the built example tables, one sub-directory per training
TRAIN, TRAIN_QIDS = "train", "train_qids"  # the Ray Train dataset names
PARTITION_BYTES = 256 * 1024**2  # input bytes per hash-shuffle partition
#: inputs up to this many bytes (Parquet on disk) are built in the driver's process instead of by Ray Data
IN_PROCESS_MAX_BYTES = 64 * 1024**2
#: a built table up to this many bytes (Parquet on disk) is kept in each worker's memory after its first pass over it,
#: instead of being streamed again every epoch (each pass is a Ray Data execution: seconds of start-up even when small)
CACHE_MAX_BYTES = 64 * 1024**2
BUILD_RECORD = "_build.json"  # inside a built table: what it was built from (readers of Parquet skip "_" files)
BUILD_VERSION = 1  # bump when the built rows change for the same inputs

# One long schema for every input row, so that tables of different shapes can be unioned and shuffled together.
_LONG = pa.schema([
    ("kind", pa.string()),  # passage | pair (utility or pool candidate) | gold | teacher | query
    ("qid", pa.string()),
    ("pid", pa.string()),
    ("rank", pa.int64()),
    ("base_score", pa.float64()),
    ("value", pa.float64()),  # utility (pair rows of the reward model) or teacher score (teacher rows)
    ("text", pa.string()),  # passage text; after the pid shuffle, on every row whose pid is in the corpus
    ("doc_id", pa.string()),
    ("split", pa.string()),
    ("question", pa.string()),
    ("gold_pids", pa.list_(pa.string())),
    ("answers", pa.list_(pa.string())),  # query rows: the gold answers (answer-match positives)
])

_COUNTS_FIELDS = [("qid", pa.string()), ("counts", pa.string()), ("row_hash", pa.string())]
REWARD_SCHEMA = pa.schema([
    *_COUNTS_FIELDS, ("has_example", pa.bool_()), ("doc_id", pa.string()), ("split", pa.string()),
    ("question", pa.string()), ("pids", pa.list_(pa.string())), ("passages", pa.list_(pa.string())),
    ("utilities", pa.list_(pa.float64())),
])
ENCODER_SCHEMA = pa.schema([
    *_COUNTS_FIELDS, ("has_example", pa.bool_()), ("question", pa.string()), ("pids", pa.list_(pa.string())),
    ("passages", pa.list_(pa.string())), ("teacher", pa.list_(pa.float64())), ("gold", pa.list_(pa.bool_())),
])


@dataclass(frozen=True)
class TrainData:
    """What the driver keeps of a built example table: where it is, how many examples, the skip counts and the
    sorted per-example hashes (for the checkpoint fingerprint) and the table's size."""

    name: str  # run-dir directory of the table
    n_examples: int
    counts: dict[str, int]
    row_hashes: list[str]
    nbytes: int = 0  # Parquet bytes on the run dir (decides whether workers keep it in memory across epochs)


# ------------------------------------------------------------------------------------------------------- building
def _long(kind: str, table: pa.Table) -> pa.Table:
    """``table``'s rows in the long schema (absent columns null)."""
    n = table.num_rows
    cols = [pa.array([kind] * n, pa.string())]
    for f in list(_LONG)[1:]:
        cols.append(table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type))
    return pa.Table.from_arrays(cols, schema=_LONG)


def _tagged(kind: str, rename: dict[str, str] | None = None) -> Callable[[pa.Table], pa.Table]:
    def fn(batch: pa.Table) -> pa.Table:
        if rename:
            batch = batch.rename_columns([rename.get(c, c) for c in batch.column_names])
        return _long(kind, batch)

    return fn


def _gold_refs(batch: pa.Table) -> pa.Table:
    """One ``gold`` row per (query, gold pid): the pid shuffle attaches its text (or finds it missing)."""
    qids, pids = [], []
    for qid, golds in zip(batch["qid"].to_pylist(), batch["gold_pids"].to_pylist(), strict=True):
        for p in golds or []:
            qids.append(qid)
            pids.append(p)
    return _long("gold", pa.table({"qid": pa.array(qids, pa.string()), "pid": pa.array(pids, pa.string())}))


def _attach_text(group: pa.Table) -> pa.Table:
    """One pid's rows: the corpus row's text goes onto every other row (null: the pid is not in the corpus)."""
    is_passage = pc.equal(group["kind"], "passage")
    texts = group.filter(is_passage)["text"]
    rest = group.filter(pc.invert(is_passage))
    text = texts[0].as_py() if len(texts) else None
    return rest.set_column(_LONG.get_field_index("text"), "text", pa.array([text] * rest.num_rows, pa.string()))


def _parts(group: pa.Table) -> dict[str, pa.Table]:
    """One query's long rows split by kind, in a fixed order (the shuffle's row order is not)."""
    group = group.sort_by([("kind", "ascending"), ("pid", "ascending"), ("rank", "ascending"),
                           ("value", "ascending")])
    return {k: group.filter(pc.equal(group["kind"], k)) for k in ("pair", "gold", "teacher", "query")}


def _corpus_of(*tables: pa.Table) -> pa.Table:
    """(pid, text) of the rows whose pid is in the corpus (text attached by the pid shuffle)."""
    texts: dict[str, str] = {}
    for t in tables:
        for pid, text in zip(t["pid"].to_pylist(), t["text"].to_pylist(), strict=True):
            if text is not None:
                texts.setdefault(pid, text)
    return pa.table({"pid": pa.array(list(texts), pa.string()), "text": pa.array(list(texts.values()), pa.string())})


def row_hash(example: RewardGroup | EncoderExample) -> str:
    """Content hash of one example (the checkpoint fingerprint covers all of them)."""
    return hashlib.sha1(json.dumps(asdict(example), sort_keys=True).encode()).hexdigest()[:16]


def _output(qid: str, counts: dict[str, int], example: Any, schema: pa.Schema) -> pa.Table:
    row: dict[str, Any] = {f.name: None for f in schema}
    row.update(qid=qid, counts=json.dumps(counts, sort_keys=True), has_example=example is not None)
    if example is not None:
        row.update({k: v for k, v in asdict(example).items() if k in schema.names}, row_hash=row_hash(example))
    return pa.Table.from_pylist([row], schema=schema)


def _reward_group(group: pa.Table) -> pa.Table:
    p = _parts(group)
    queries = p["query"].select(["qid", "doc_id", "split", "question"])
    utilities = p["pair"].select(["qid", "pid", "value"]).rename_columns(["qid", "pid", "utility"])
    groups, skips = build_reward_groups(queries, _corpus_of(p["pair"]), utilities)
    return _output(group["qid"][0].as_py(), skips, groups[0] if groups else None, REWARD_SCHEMA)


def _encoder_group(group: pa.Table, *, n_hard_negatives: int, useful_quantile: float, splits: tuple[str, ...],
                   with_teacher: bool, positives: str, min_teacher_margin: float) -> pa.Table:
    p = _parts(group)
    queries = p["query"].select(["qid", "question", "gold_pids", "split", "answers"])
    candidates = p["pair"].select(["qid", "pid", "rank", "base_score"])
    teacher = p["teacher"].select(["qid", "pid", "value"]).rename_columns(["qid", "pid", "teacher_score"])
    examples, counts = build_encoder_examples(
        queries, _corpus_of(p["pair"], p["gold"]), candidates, teacher if with_teacher else None,
        n_hard_negatives=n_hard_negatives, useful_quantile=useful_quantile, splits=splits, positives=positives,
        min_teacher_margin=min_teacher_margin,
    )
    counts.pop("examples", None)  # counted by the driver from has_example
    return _output(group["qid"][0].as_py(), counts, examples[0] if examples else None, ENCODER_SCHEMA)


@dataclass(frozen=True)
class _Source:
    """One input of a build: a run-dir table's columns, mapped batch by batch into the long schema."""

    table: str
    columns: list[str]
    to_long: Callable[[pa.Table], pa.Table]


def _read(run_dir: RunDir, name: str, columns: list[str]) -> Any:
    import ray.data

    if not run_dir.exists(name):
        raise FileNotFoundError(f"{run_dir.path(name)} not found: run the stage that writes {name} first")
    return ray.data.read_parquet(run_dir.path(name), filesystem=run_dir.fs, columns=columns)


def _ray_dataset(run_dir: RunDir, sources: list[_Source]) -> Any:
    """The union of ``sources`` as one Ray Dataset in the long schema."""
    parts = [_read(run_dir, s.table, s.columns).map_batches(s.to_long, batch_format="pyarrow") for s in sources]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _local_table(sources: list[_Source], read: Callable[[str, tuple[str, ...]], pa.Table]) -> pa.Table:
    """The union of ``sources`` as one in-memory table in the long schema (the small-input path); ``read`` returns
    a run-dir table's columns (cached: the encoder build maps the queries table twice)."""
    return pa.concat_tables([s.to_long(read(s.table, tuple(s.columns))) for s in sources])


def _map_groups(table: pa.Table, key: str, fn: Callable[[pa.Table], pa.Table], schema: pa.Schema) -> pa.Table:
    """``fn`` on each group of ``table``'s rows that share ``key`` (null keys form one group, as in Ray Data's
    ``groupby``), the results concatenated: the in-process ``groupby(key).map_groups(fn)``."""
    import numpy as np

    if table.num_rows == 0:
        return schema.empty_table()
    table = table.sort_by([(key, "ascending")])
    keys = table[key].to_numpy(zero_copy_only=False)
    bounds = [0, *(np.flatnonzero(keys[1:] != keys[:-1]) + 1).tolist(), table.num_rows]
    out = [fn(table.slice(a, b - a)) for a, b in itertools.pairwise(bounds)]
    return pa.concat_tables([t.cast(schema) for t in out])


def _input_files(run_dir: RunDir, names: list[str]) -> list[Any]:
    """The files (pyarrow ``FileInfo``) of the run-dir tables ``names``, each a file or a directory, sorted by path
    within each table: what a build reads, sized by :func:`_partitions` and stamped by :func:`build_stamp`."""
    import pyarrow.fs as pafs

    files = []
    for name in names:
        info = run_dir.fs.get_file_info(run_dir.path(name))
        infos = (run_dir.fs.get_file_info(pafs.FileSelector(info.path, recursive=True))
                 if info.type == pafs.FileType.Directory else [info])
        files += sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)
    return files


def _partitions(files: list[Any]) -> int:
    """Hash-shuffle partitions (aggregator actors): one per :data:`PARTITION_BYTES` of input, at most one per CPU of
    the cluster (Ray's default of 200 is for big clusters: on a small one, starting them dominates)."""
    import ray

    size = sum(i.size or 0 for i in files)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(cpus, -(-size // PARTITION_BYTES)))


def build_stamp(files: list[Any], params: dict[str, Any]) -> str:
    """What a built table depends on: every input file's path, size and modification time, the build parameters and
    :data:`BUILD_VERSION` (a rerun on unchanged inputs reuses the table: the resume of a killed run starts at once)."""
    record = {"version": BUILD_VERSION, "params": params, "files": [(i.path, i.size, i.mtime_ns) for i in files]}
    return hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _write_and_summarise(run_dir: RunDir, name: str, params: dict[str, Any], by_pid: list[_Source],
                         others: list[_Source], group_fn: Callable[[pa.Table], pa.Table], schema: pa.Schema,
                         in_process_max_bytes: int) -> TrainData:
    inputs = list(dict.fromkeys(s.table for s in by_pid + others))
    files = _input_files(run_dir, inputs)
    stamp = build_stamp(files, params)
    record = f"{name}/{BUILD_RECORD}"
    if not (run_dir.exists(record) and run_dir.read_json(record).get("stamp") == stamp):
        in_process = sum(i.size or 0 for i in files) <= in_process_max_bytes
        if in_process:
            read = functools.cache(lambda table, columns: run_dir.read_table(table, columns=list(columns)))
            texts = _map_groups(_local_table(by_pid, read), "pid", _attach_text, _LONG)
            local_rows = _map_groups(pa.concat_tables([texts, _local_table(others, read)]), "qid", group_fn, schema)
        else:  # lazy: runs in write_parquet
            parts = _partitions(files)
            texts = _ray_dataset(run_dir, by_pid).groupby("pid", num_partitions=parts).map_groups(
                _attach_text, batch_format="pyarrow")
            rows = texts.union(_ray_dataset(run_dir, others)).groupby("qid", num_partitions=parts).map_groups(
                group_fn, batch_format="pyarrow")
        run_dir.remove(name)  # an older or partial table (this stage holds the run dir's lease)
        if in_process:
            run_dir.write_table(f"{name}/part-000000.parquet", local_rows)
        else:
            rows.write_parquet(run_dir.path(name), filesystem=run_dir.fs)
            if not run_dir.exists(name):  # no query at all: Ray Data writes no file
                run_dir.write_table(f"{name}/part-empty.parquet", schema.empty_table())
        run_dir.write_json(record, {"stamp": stamp, "inputs": inputs, "params": params})
    small = run_dir.read_table(name, columns=["counts", "has_example", "row_hash"])
    counts: Counter[str] = Counter()
    for c in small["counts"].to_pylist():
        counts.update(json.loads(c))
    hashes = sorted(h for h, ok in zip(small["row_hash"].to_pylist(), small["has_example"].to_pylist(), strict=True)
                    if ok)
    nbytes = sum(i.size or 0 for i in _input_files(run_dir, [name]))
    return TrainData(name, len(hashes), dict(counts), hashes, nbytes)


def build_reward_data(run_dir: RunDir, name: str, *, in_process_max_bytes: int = IN_PROCESS_MAX_BYTES) -> TrainData:
    """Every labeled query's :class:`RewardGroup` (all splits) -> ``name`` in the run directory.

    Args:
        in_process_max_bytes: inputs up to this size are built in this process, larger ones by Ray Data.
    """
    by_pid = [_Source(CORPUS, ["pid", "text"], _tagged("passage")),
              _Source(UTILITIES, ["qid", "pid", "utility"], _tagged("pair", {"utility": "value"}))]
    others = [_Source(QUERIES, ["qid", "doc_id", "split", "question"], _tagged("query"))]
    return _write_and_summarise(run_dir, name, {}, by_pid, others, _reward_group, REWARD_SCHEMA, in_process_max_bytes)


def build_encoder_data(run_dir: RunDir, name: str, *, teacher: tuple[str, str] | None, n_hard_negatives: int,
                       useful_quantile: float, splits: tuple[str, ...], positives: str = "gold",
                       min_teacher_margin: float = 0.0, in_process_max_bytes: int = IN_PROCESS_MAX_BYTES) -> TrainData:
    """Every query of ``splits``'s :class:`EncoderExample` -> ``name`` in the run directory.

    Args:
        teacher: (run-dir table, score column) of the teacher scores, or None (no teacher: the gold-only ablation).
        positives: what a group's positives are (:data:`uae_ray.training.data.POSITIVES`).
        min_teacher_margin: teacher_top only: skip a query whose teacher top leads its second by less.
        in_process_max_bytes: inputs up to this size are built in this process, larger ones by Ray Data.
    """
    query_columns = ["qid", "question", "gold_pids", "split", "answers"]
    by_pid = [_Source(CORPUS, ["pid", "text"], _tagged("passage")),
              _Source(CANDIDATES, ["qid", "pid", "rank", "base_score"], _tagged("pair")),
              _Source(QUERIES, query_columns, _gold_refs)]
    others = [_Source(QUERIES, query_columns, _tagged("query"))]
    if teacher is not None:
        table, column = teacher
        others.append(_Source(table, ["qid", "pid", column], _tagged("teacher", {column: "value"})))
    group_fn = functools.partial(_encoder_group, n_hard_negatives=n_hard_negatives, useful_quantile=useful_quantile,
                                 splits=splits, with_teacher=teacher is not None, positives=positives,
                                 min_teacher_margin=min_teacher_margin)
    params = {"teacher": teacher, "n_hard_negatives": n_hard_negatives, "useful_quantile": useful_quantile,
              "splits": list(splits)}
    if positives != "gold":  # tables built before positives existed keep their stamp
        params["positives"] = positives
    if min_teacher_margin:  # tables built before the margin existed keep their stamp
        params["min_teacher_margin"] = min_teacher_margin
    return _write_and_summarise(run_dir, name, params, by_pid, others, group_fn, ENCODER_SCHEMA,
                                in_process_max_bytes)


def in_memory(data: TrainData) -> bool:
    """Whether a built table is small enough (:data:`CACHE_MAX_BYTES`) to go to the object store from the driver's
    memory and to be kept whole in each worker's memory across epochs; larger ones are read by Ray Data's read tasks
    and streamed by each worker once per epoch."""
    return data.nbytes <= CACHE_MAX_BYTES


def train_datasets(run_dir: RunDir, data: TrainData, where: Any = None) -> dict[str, Any]:
    """The Ray Train ``datasets=`` of a built table: ``train`` (the examples, optionally filtered by the Ray Data
    expression ``where``) and ``train_qids`` (their ids only)."""
    import ray.data
    from ray.data.expressions import col, lit

    keep = col("has_example") == lit(True)
    if where is not None:
        keep = keep & where
    # materialized once into the object store (blocks on the nodes, spilled to disk when large; the driver holds
    # only their references): every worker iterates it each epoch, and re-reading the files costs each worker tens
    # of seconds of Ray Data start-up per epoch on a small cluster. A small table is read by the driver and put in
    # the object store as it is: Ray Data's read tasks cost seconds even for a few rows (5-9 s against 0.15 s for
    # 14 rows on the 2-core test machine)
    if in_memory(data):
        source = ray.data.from_arrow(run_dir.read_table(data.name))
    else:
        source = ray.data.read_parquet(run_dir.path(data.name), filesystem=run_dir.fs)
    ds = source.filter(expr=keep).materialize()
    return {TRAIN: ds, TRAIN_QIDS: ds.select_columns(["qid"]).materialize()}


def read_examples(run_dir: RunDir, name: str, qids: list[str], kind: type) -> list[Any]:
    """The examples of ``qids`` (driver-side evaluation of a bounded number of queries), in ``qids`` order."""
    import pyarrow.parquet as pq

    names = [f.name for f in fields(kind)]
    table = pq.read_table(run_dir.path(name), filesystem=run_dir.fs, columns=names,
                          filters=pc.field("qid").isin(qids))
    rows = {r["qid"]: r for r in table.to_pylist()}
    return [kind(**rows[q]) for q in qids if q in rows]


# ------------------------------------------------------------------------------------------------- on the workers
def sorted_qids(batches: Iterable[pa.Table]) -> list[str]:
    """Every example's query id, sorted (the ``train_qids`` dataset); a repeated id is an error."""
    qids = sorted(q for b in batches for q in b["qid"].to_pylist())
    dup = next((a for a, b in itertools.pairwise(qids) if a == b), None)
    if dup is not None:
        raise ValueError(f"training table has query {dup!r} twice")
    return qids


def rank_plan(qids: list[str], *, epoch: int, first_step: int, n_steps: int, rank: int, world: int,
              per_worker: int, seed: int) -> list[list[str]]:
    """Query ids of ``rank``'s batches at steps ``first_step .. n_steps - 1`` of ``epoch``: positions
    ``(step * world + rank) * per_worker ...`` of the epoch's seeded permutation of the sorted ids."""
    perm = epoch_permutation(len(qids), epoch, seed)
    plan = []
    for step in range(first_step, n_steps):
        start = (step * world + rank) * per_worker
        plan.append([qids[int(i)] for i in perm[start : start + per_worker]])
    return plan


def rank_batches(batches: Iterable[pa.Table], plan: list[list[str]], kind: type) -> list[list[Any]]:
    """Stream the table once and keep the rows ``plan`` names, as ``kind`` (RewardGroup / EncoderExample) batches."""
    names = [f.name for f in fields(kind)]
    wanted = pa.array(sorted({q for b in plan for q in b}), pa.string())
    rows: dict[str, Any] = {}
    for b in batches:
        for r in b.filter(pc.is_in(b["qid"], value_set=wanted)).select(names).to_pylist():
            rows[r["qid"]] = kind(**r)
    missing = [q for q in wanted.to_pylist() if q not in rows]
    if missing:
        raise ValueError(f"training table lacks {len(missing)} planned queries, e.g. {missing[:3]}")
    return [[rows[q] for q in b] for b in plan]


def pickled_size(obj: Any) -> int:
    """Bytes of ``obj`` pickled the way Ray ships a ``train_loop_config`` (cloudpickle)."""
    import ray.cloudpickle

    return len(ray.cloudpickle.dumps(obj))

