"""Exact and near-duplicate detection for packing (data.dedup).

Exact: a 16-byte BLAKE2b of the document's text. Near: MinHash signatures (datasketch) over the set of
`ngram`-token shingles of the tokenized document, indexed with MinHashLSH at the Jaccard `threshold`.
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
        self._perm = MinHash(num_perm=self.num_perm, seed=_SEED).permutations  # drawn once, reused per document

    def signature(self, ids: np.ndarray) -> np.ndarray:
        ids = ids.astype(np.uint64)
        n = min(self.ngram, len(ids))
        h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
        for k in range(n):  # h = Σ ids[i+k]·M^(n-1-k) mod 2^64, for every window i at once
            h = h * _MULT + ids[k : len(ids) - n + 1 + k]
        shingles = np.unique(h >> np.uint64(32))
        m = self._minhash(num_perm=self.num_perm, seed=_SEED, hashfunc=int, permutations=self._perm, scheme="affine32")
        m.update_batch(shingles.tolist())
        return m.hashvalues.astype(np.uint32)


class Index:
    """Documents seen so far; `add` says whether a new one duplicates one of them."""

    def __init__(self, cfg):
        self.exact = cfg.exact
        self.near = cfg.near
        self.num_perm = cfg.num_perm
        self._hashes: dict[bytes, str] = {}
        if cfg.near:
            from datasketch import MinHash, MinHashLSH

            self._minhash = MinHash
            self._lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        self._owner: list[str] = []  # source of the n-th document in the LSH index

    def add(self, content_hash: bytes, signature: np.ndarray | None, source: str) -> str | None:
        """None if the document is new (and now indexed), else 'exact_within', 'near_across', ..."""
        if self.exact:
            first = self._hashes.get(content_hash)
            if first is not None:
                return "exact_within" if first == source else "exact_across"
            self._hashes[content_hash] = source
        if self.near:
            m = self._minhash(num_perm=self.num_perm, hashvalues=signature.astype(np.uint64), scheme="affine32")
            matches = self._lsh.query(m)
            if matches:
                first = self._owner[min(matches)]
                return "near_within" if first == source else "near_across"
            self._lsh.insert(len(self._owner), m, check_duplication=False)
            self._owner.append(source)
        return None
