"""New data under a prefix (a FineTuneSchedule's ``trigger.newData``) and a run's data manifest.

The operator polls the prefix, one paginated listing per poll, and compares each object's key and ETag with
what earlier runs consumed: an object not consumed, or rewritten since (a new ETag), is new. It counts the
examples of each new object once (the counts are cached), and when enough have come it starts a run whose
data is a manifest: the new objects, and a sample of the earlier ones to replay (against forgetting).

Under the template's output.uri (OUTPUT)::

    OUTPUT/NAME-rN/data.manifest.json   run N's data: its new objects, and the earlier ones it replays a share of
    OUTPUT/NAME-newdata.json            counts of objects seen but not consumed yet (a cache: lost, they are
                                        counted again)

Each manifest holds everything consumed so far (its files and its replay files), so the consumed set is one
URI, the latest run's manifest: the watermark, kept in the schedule's status and on the run, whatever the
number of objects. A run's manifest is written before the run is created, and the run names it, so a crash
between the two neither starts a run twice for the same data nor loses an object.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from hashlib import sha256
from pathlib import Path

from kubetune.data.readers import is_data_file, iter_file
from kubetune.spec import Storage
from kubetune.storage import Store, StorageError, join, store_for

MANIFEST_NAME = "data.manifest.json"
MANIFEST_SUFFIX = ".manifest.json"
FORMAT = "kubetune.dev/data-manifest/v1"


def manifest_uri(output: str, run: str) -> str:
    return join(output, run, MANIFEST_NAME)


def cache_uri(output: str, schedule: str) -> str:
    return join(output, f"{schedule}-newdata.json")


def is_manifest(uri: str) -> bool:
    return uri.endswith(MANIFEST_SUFFIX)


def count_examples(store: Store, uri: str) -> int:
    """Records in one data file (JSONL lines, CSV rows, parquet rows), as preparation reads them."""
    if uri.lower().endswith(".parquet"):
        try:
            import pyarrow  # noqa: F401 - the operator's image has no pyarrow (kubetune[data])
        except ModuleNotFoundError:
            raise ValueError(f"{uri}: the operator cannot count a parquet file's rows (its image has no pyarrow); "
                             "put new data for trigger.newData in JSONL or CSV files") from None
    with tempfile.TemporaryDirectory(prefix="kubetune-count-") as tmp:
        path = Path(tmp) / Path(uri).name
        store.download(uri, path)
        with open(path, "rb") as f:
            return sum(1 for _ in iter_file(uri, f))


def parse_manifest(raw: bytes, where: str) -> dict:
    """A manifest's content, checked; ValueError naming ``where`` when it is not one."""
    try:
        doc = json.loads(raw)
        files = [(e["uri"], e.get("etag", ""), int(e["examples"])) for e in doc["files"] + doc["replay"]["files"]]
        fraction, _ = float(doc["replay"]["fraction"]), int(doc["replay"]["seed"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a kubetune data manifest ({type(e).__name__}: {e})") from None
    if doc.get("format") != FORMAT or not 0 <= fraction <= 1 or not all(isinstance(u, str) for u, _, _ in files):
        raise ValueError(f"{where}: not a kubetune data manifest (format {FORMAT} expected)")
    return doc


def consumed_by(manifest: dict | None) -> dict[str, dict]:
    """Every object a run and the runs before it trained on: uri → {uri, etag, examples}."""
    if not manifest:
        return {}
    return {e["uri"]: e for e in manifest["replay"]["files"] + manifest["files"]}


def run_manifest(new: list[dict], earlier: list[dict], fraction: float, seed: int) -> dict:
    """A run's data: the new objects, and ``fraction`` of the earlier examples (all of them when nothing is new:
    a requested or scheduled run without new data retrains on everything seen)."""
    return {"format": FORMAT, "files": new,
            "replay": {"fraction": fraction if new else 1.0, "seed": seed, "files": earlier}}


def replay_seed(namespace: str, run: str) -> int:
    return int(sha256(f"{namespace}/{run}".encode()).hexdigest()[:12], 16)


def replay_picks(manifest: dict) -> dict[str, frozenset[int]]:
    """Which records of each replay file the run takes (their ordinals in the file): exactly round(fraction × total)
    of them, drawn with the run's seed, so a retried run takes the same ones."""
    import numpy as np  # here, not at the top: the operator (no numpy in its image) polls and writes manifests

    replay = manifest["replay"]
    counts = np.array([e["examples"] for e in replay["files"]], np.int64)
    total = int(counts.sum())
    k = min(total, round(replay["fraction"] * total))
    picks = np.sort(np.random.default_rng(replay["seed"]).choice(total, k, replace=False)) if k else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    out = {}
    for n, e in enumerate(replay["files"]):
        lo, hi = np.searchsorted(picks, [starts[n], starts[n + 1]])
        out[e["uri"]] = frozenset((picks[lo:hi] - starts[n]).tolist())
    return out


@dataclass
class Observation:
    """One poll of the prefix: what is new since the watermark (the latest consumed manifest)."""

    polled_at: datetime
    watermark: str | None
    pending: list[dict] = field(default_factory=list)  # new objects: {uri, etag, examples}
    earlier: list[dict] = field(default_factory=list)  # consumed objects still there unchanged (the replay pool)
    error: str | None = None

    @property
    def examples(self) -> int:
        return sum(e["examples"] for e in self.pending)


def poll(uri: str, output: str, schedule: str, storage: Storage | None, watermark: str | None,
         now: datetime) -> Observation:
    """List the prefix once and count the examples of objects new since ``watermark``; a storage failure is in
    ``error`` (one line), not raised: the next poll tries again."""
    try:
        store = store_for(uri, storage)
        consumed = consumed_by(parse_manifest(store.read_bytes(watermark), watermark)) if watermark else {}
        # the runs' own files are not new data, should the output be under the prefix
        listing = {u: etag for u, etag in store.list_etags(uri).items()
                   if is_data_file(u) and not is_manifest(u) and not u.startswith(output)}
        cache = _read_cache(store, cache_uri(output, schedule))
        pending, counted = [], False
        for u, etag in sorted(listing.items()):
            if consumed.get(u, {}).get("etag") == etag:
                continue
            if cache.get(u, {}).get("etag") != etag:
                cache[u], counted = {"uri": u, "etag": etag, "examples": count_examples(store, u)}, True
            pending.append(cache[u])
        if counted or len(cache) != len(pending):
            store.write_bytes(cache_uri(output, schedule), json.dumps({"objects": pending}).encode())
        earlier = [e for u, e in sorted(consumed.items()) if listing.get(u) == e["etag"]]
        return Observation(now, watermark, pending, earlier)
    except (StorageError, ValueError) as e:
        return Observation(now, watermark, error=str(e).splitlines()[0] if str(e) else type(e).__name__)


def _read_cache(store: Store, uri: str) -> dict[str, dict]:
    if not store.exists(uri):
        return {}
    try:
        return {e["uri"]: e for e in json.loads(store.read_bytes(uri))["objects"]}
    except (ValueError, KeyError, TypeError):  # a cache only: a broken one is counted again
        return {}
