"""Exact and near-duplicate detection for packing (data.dedup).

Exact: a 16-byte BLAKE2b of the document's text. Near: MinHash signatures (datasketch) over the set of
`ngram`-token shingles of the tokenized document, banded as datasketch's MinHashLSH bands them for the
Jaccard `threshold`, in a leaner index (`Index`).
Shingling token ids rather than words reuses the tokenizer's work; the shingle hash is a 64-bit polynomial
over the ids, of which the high 32 bits feed datasketch (its 32-bit scheme).

The first document of a cluster is kept; later ones are dropped and counted as duplicates `within` their
source or `across` (of an earlier source in data.sources order).
"""

from __future__ import annotations

import numpy as np

_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (2^64 / golden ratio): mixes the ids of a shingle
_SEED = 1


class Signer:
    """MinHash signature (num_perm uint32) of a token array's shingles."""

    def __init__(self, cfg):
        from datasketch import MinHash  # imported here: it pulls in scipy (~0.4 s), and exact dedup needs neither

        self._minhash = MinHash
        self.num_perm, self.ngram = cfg.num_perm, cfg.ngram
        self.permutations = MinHash(num_perm=self.num_perm, seed=_SEED).permutations  # drawn once, reused

    def signature(self, ids: np.ndarray) -> np.ndarray:
        ids = ids.astype(np.uint64)
        n = min(self.ngram, len(ids))
        h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
        for k in range(n):  # h = Σ ids[i+k]·M^(n-1-k) mod 2^64, for every window i at once
            h = h * _MULT + ids[k : len(ids) - n + 1 + k]
        shingles = np.unique(h >> np.uint64(32))
        m = self._minhash(num_perm=self.num_perm, seed=_SEED, hashfunc=int, permutations=self.permutations,
                          scheme="affine32")
        m.update_batch(shingles.tolist())
        return m.hashvalues.astype(np.uint32)


class Index:
    """Documents seen so far; `add` says whether a new one duplicates one of them.

    Near-duplicates are found by MinHash LSH with datasketch's banding (b bands of r rows, chosen by
    `MinHashLSH` for the threshold and num_perm) in an index of our own. A document is indexed only when it
    matches none, so each band's bucket holds one document, and a dict per band from the bucket's key (a
    64-bit hash of the band's r values) to that document's number is the whole index. datasketch's
    `MinHashLSH` keeps a set per bucket and each band's bytes: over 1M documents 3.5 KB each at threshold 0.8
    (b=9, r=13) and 5.2 KB at 0.7 (b=14, r=9), against 0.87 and 1.36 KB here, 7x faster
    (bench/dedup_index.py); a merge of millions of documents is held in one process. Two distinct bands share
    a 64-bit key with odds ~n²/2^65 per band: ~3e-6 over 10M documents.
    """

    def __init__(self, cfg):
        self.exact = cfg.exact
        self.near = cfg.near
        self._hashes: dict[bytes, str] = {}
        self._owner: list[str] = []  # source of the n-th document in the near-duplicate index
        if cfg.near:
            from datasketch import MinHashLSH

            lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)  # for its (b, r) only
            self._bands, self._rows = lsh.b, lsh.r
            self._tables: list[dict[int, int]] = [{} for _ in range(self._bands)]
            # key of a band = Σ v_k·M^(r-1-k) mod 2^64 over its values v_k: one multiply-and-sum per document
            self._powers = np.array([pow(int(_MULT), self._rows - 1 - k, 2**64) for k in range(self._rows)],
                                    dtype=np.uint64)

    def band_keys(self, signature: np.ndarray) -> list[int]:
        bands = signature[: self._bands * self._rows].astype(np.uint64).reshape(self._bands, self._rows)
        return (bands * self._powers).sum(axis=1, dtype=np.uint64).tolist()

    def add(self, content_hash: bytes, signature: np.ndarray | None, source: str) -> str | None:
        """None if the document is new (and now indexed), else 'exact_within', 'near_across', ..."""
        if self.exact:
            first = self._hashes.get(content_hash)
            if first is not None:
                return "exact_within" if first == source else "exact_across"
            self._hashes[content_hash] = source
        if self.near:
            keys = self.band_keys(signature)
            matches = [n for table, key in zip(self._tables, keys) if (n := table.get(key)) is not None]
            if matches:
                first = self._owner[min(matches)]
                return "near_within" if first == source else "near_across"
            n = len(self._owner)
            for table, key in zip(self._tables, keys):
                table[key] = n
            self._owner.append(source)
        return None
