"""The Redis store of the persistent dedup index (see index.py for the interface).

For many workers: datasketch's own `MinHashLSH` with `storage_config={"type": "redis",
"basename": ...}` holds the band buckets; beside it, under `<basename>:bk:*`, signatures, exact
keys and each run's members (for `remove_run`), and `<basename>:bk:taken_down` (document id ->
run id) flagging the entries of taken-down documents, which removing their run leaves in
place. Keys are raw bytes (`prepickle=False`): nothing read from a shared server is ever
unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from booksmith.filters.dedup.index import (
    FORMAT,
    VERSION,
    DedupIndexError,
    Entries,
    Match,
    index_params,
)
from booksmith.filters.dedup.minhash import SCHEME, MinHashParams


class RedisIndex:
    """A MinHash index on a Redis server, shared by every worker (see the module docstring)."""

    def __init__(self, url: str, basename: str, params: MinHashParams | None = None) -> None:
        import redis
        from datasketch import MinHashLSH

        self.params = params = params or MinHashParams()
        self.url = url
        self.basename = basename
        try:
            kwargs = redis.connection.parse_url(url)
        except ValueError as e:
            raise DedupIndexError(f"{url}: not a Redis URL ({e})") from None
        self._r: Any = redis.Redis(**kwargs)  # replies are bytes (no decode_responses)
        self._p = f"{basename}:bk:"
        try:
            meta: Any = self._r.hgetall(self._p + "meta")
            foreign = not meta and bool(self._r.exists(basename.encode() + b"_keys"))
        except redis.RedisError as e:
            raise DedupIndexError(f"{url}: cannot reach Redis ({e})") from None
        expected = json.dumps(index_params(params), sort_keys=True)
        if foreign:
            raise DedupIndexError(
                f"{url} basename {basename!r}: holds a datasketch index booksmith did not write"
            )
        if meta:
            if meta.get(b"format") != FORMAT.encode():
                raise DedupIndexError(f"{url} key {self._p}meta: not a booksmith MinHash index")
            if int(meta.get(b"version", b"0")) > VERSION:
                raise DedupIndexError(
                    f"{url} key {self._p}meta: newer index version; upgrade booksmith"
                )
            if meta.get(b"params", b"").decode() != expected:
                raise DedupIndexError(
                    f"{url} key {self._p}meta: built with parameters {meta.get(b'params')!r}, "
                    f"this run uses {expected}"
                )
        self._meta: dict[str | bytes, str | bytes] = {
            "format": FORMAT,
            "version": str(VERSION),
            "params": expected,
        }
        self.lsh = MinHashLSH(
            num_perm=params.num_perm,
            params=(params.bands, params.rows),
            storage_config={"type": "redis", "basename": basename.encode(), "redis": kwargs},
            prepickle=False,
        )

    @classmethod
    def as_built(cls, url: str, basename: str) -> RedisIndex:
        """The index opened with the parameters it was built with (read from its meta), for
        work that brings no signatures of its own: flags, removing a run."""
        import redis

        try:
            r = redis.Redis(**redis.connection.parse_url(url))
            raw = r.hget(f"{basename}:bk:meta", "params")
        except (ValueError, redis.RedisError) as e:
            raise DedupIndexError(f"{url}: cannot reach Redis ({e})") from None
        fields = MinHashParams.__annotations__
        built = {k: v for k, v in json.loads(raw or "{}").items() if k in fields}
        return cls(url, basename, MinHashParams(**built) if built else None)

    @staticmethod
    def _key(run_id: str, doc_id: str) -> bytes:
        return f"{run_id}\x00{doc_id}".encode()

    def _band_hashes(self, sig: np.ndarray) -> list[bytes]:
        # datasketch's own band key: the band's hash values, byte-swapped, as bytes.
        r = self.params.rows
        return [bytes(sig[b * r : (b + 1) * r].byteswap().data) for b in range(self.params.bands)]

    def _decode(self, key: bytes, value: bytes) -> tuple[Match, np.ndarray]:
        run_id, doc_id = key.decode().split("\x00", 1)
        sig = np.frombuffer(value[: 4 * self.params.num_perm], dtype="<u4")
        return Match(id=doc_id, run_id=run_id, jaccard=0.0), sig

    def lookup_exact(self, keys: np.ndarray) -> list[Match | None]:
        if len(keys) == 0:
            return []
        fields = [int(k).to_bytes(8, "little") for k in np.asarray(keys, dtype=np.uint64)]
        hits = self._r.hmget(self._p + "exact", fields)
        out: list[Match | None] = []
        for hit in hits:
            if hit is None:
                out.append(None)
                continue
            run_id, doc_id = hit.decode().split("\x00", 1)
            out.append(Match(id=doc_id, run_id=run_id, jaccard=1.0))
        return out

    def lookup_near(self, sigs: np.ndarray, threshold: float) -> list[Match | None]:
        n = sigs.shape[0]
        out: list[Match | None] = [None] * n
        if n == 0:
            return out
        sigs = np.asarray(sigs, dtype=np.uint32)
        per_band = [self._band_hashes(s) for s in sigs]
        candidates: list[set[bytes]] = [set() for _ in range(n)]
        for b, table in enumerate(self.lsh.hashtables):  # one pipelined round trip per band
            for i, found in enumerate(table.getmany(*(h[b] for h in per_band))):
                candidates[i].update(found)
        wanted = sorted(set().union(*candidates))
        if not wanted:
            return out
        values = self._r.hmget(self._p + "sig", wanted)
        stored = {
            k: self._decode(k, v) for k, v in zip(wanted, values, strict=True) if v is not None
        }
        for i, keys in enumerate(candidates):
            best: Match | None = None
            for k in keys:
                if k not in stored:
                    continue  # an entry whose commit has not finished
                match, sig = stored[k]
                j = float((sig == sigs[i]).mean())
                if j >= threshold and (best is None or j > best.jaccard):
                    best = Match(match.id, match.run_id, j)
            out[i] = best
        return out

    def add(self, run_id: str, ids: Sequence[str], sigs: np.ndarray, exact: np.ndarray) -> int:
        return self.add_entries(run_id, Entries.of(ids, sigs, exact))

    def add_entries(self, run_id: str, entries: Entries) -> int:
        from datasketch import LeanMinHash

        # replace: a retried commit never doubles a run (its flags stay on the ids it still has)
        flagged = {i for i, r in self.taken_down().items() if r == run_id}
        self._drop(run_id, list(self._r.smembers(self._p + "run:" + run_id)), keep=0)
        if flagged:
            held = {str(i) for ids, _, _ in entries.blocks() for i in ids if str(i) in flagged}
            if gone := sorted(flagged - held):
                self._r.hdel(self._p + "taken_down", *gone)
        self._r.hset(self._p + "meta", mapping=self._meta)
        # Order: members, then buckets, then signatures, then the run's count. A crash leaves a
        # "pending" run whose entries queries ignore (no signature) and remove_run can clear.
        self._r.hset(self._p + "runs", run_id, "pending")
        added = 0
        for ids, sigs, exact in entries.blocks():
            if len(ids) != sigs.shape[0] or len(ids) != exact.shape[0]:
                raise ValueError("ids, signatures and exact keys differ in length")
            keys = [self._key(run_id, str(i)) for i in ids]
            if keys:
                self._r.sadd(self._p + "run:" + run_id, *keys)
            sigs = np.ascontiguousarray(sigs, dtype="<u4")
            with self.lsh.insertion_session(buffer_size=10_000) as session:
                for key, sig in zip(keys, sigs, strict=True):
                    session.insert(
                        key,
                        LeanMinHash(seed=self.params.seed, hashvalues=sig, scheme=SCHEME),
                        check_duplication=False,
                    )
            pipe = self._r.pipeline()
            for start in range(0, len(keys), 10_000):
                chunk = range(start, min(start + 10_000, len(keys)))
                pipe.hset(
                    self._p + "sig",
                    mapping={
                        keys[i]: sigs[i].tobytes() + int(exact[i]).to_bytes(8, "little")
                        for i in chunk
                    },
                )
                pipe.hset(
                    self._p + "exact",
                    mapping={int(exact[i]).to_bytes(8, "little"): keys[i] for i in chunk},
                )
                pipe.execute()
            added += len(keys)
        self._r.hset(self._p + "runs", run_id, str(added))
        return added

    def remove_run(self, run_id: str) -> int:
        """Remove one run's entries, except those of taken-down documents (they keep blocking
        the text: a retired version's takedown still holds); returns how many were removed."""
        members = list(self._r.smembers(self._p + "run:" + run_id))
        if not members and not self._r.hexists(self._p + "runs", run_id):
            return 0
        flagged = {self._key(run_id, i) for i, r in self.taken_down().items() if r == run_id}
        held = flagged & set(members)
        gone = [k for k in members if k not in held]
        if held and not gone:
            return 0  # only taken-down entries: nothing to remove
        self._drop(run_id, gone, keep=len(held))
        return len(gone)

    def _drop(self, run_id: str, keys: list[bytes], keep: int) -> None:
        """Delete these entries of a run; with `keep`, that many of its entries stay."""
        with self.lsh.deletion_session(buffer_size=10_000) as session:
            for key in keys:
                if key in self.lsh:
                    session.remove(key)
        values = self._r.hmget(self._p + "sig", keys) if keys else []
        pipe = self._r.pipeline()
        for key, value in zip(keys, values, strict=True):
            if value is not None:
                exact_field = value[4 * self.params.num_perm :]
                if self._r.hget(self._p + "exact", exact_field) == key:
                    pipe.hdel(self._p + "exact", exact_field)
        if keys:
            pipe.hdel(self._p + "sig", *keys)
        if keep:
            if keys:
                pipe.srem(self._p + "run:" + run_id, *keys)
            pipe.hset(self._p + "runs", run_id, str(keep))
        else:
            pipe.delete(self._p + "run:" + run_id)
            pipe.hdel(self._p + "runs", run_id)
        pipe.execute()

    def flag_taken_down(self, ids: Iterable[str]) -> int:
        """Flag the entries of these document ids as taken down (they stay, and still block
        the text); returns how many entries were flagged."""
        wanted = sorted({str(i) for i in ids})
        flags: dict[str, str] = {}
        for run_id in self.runs():
            keys = [self._key(run_id, i) for i in wanted]
            held = self._r.smismember(self._p + "run:" + run_id, keys) if keys else []
            flags.update({i: run_id for i, h in zip(wanted, held, strict=True) if h})
        if flags:
            self._r.hset(self._p + "taken_down", mapping=flags)
        return len(flags)

    def taken_down(self) -> dict[str, str]:
        raw = self._r.hgetall(self._p + "taken_down")
        return {k.decode(): v.decode() for k, v in raw.items()}

    def runs(self) -> dict[str, int]:
        raw = self._r.hgetall(self._p + "runs")
        return {k.decode(): int(v) if v.isdigit() else -1 for k, v in raw.items()}

    def __len__(self) -> int:
        return int(self._r.hlen(self._p + "sig"))

    def close(self) -> None:
        self._r.close()
