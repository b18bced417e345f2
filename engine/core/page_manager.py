"""KV page allocation with a prefix cache (no JAX).

The KV cache is `num_pages` pages of `page_size` token slots. Page 0 is never handed out:
padding rows of a step write there. Each running request owns a page table; a page's
reference count is the number of tables holding it.

Prefix caching: when a page is FULL and all its tokens are computed, it is registered under
a chained hash of (parent page's hash, the page's token ids); the first page's parent is
`root_hash(request.cache_salt)`, so requests of different salts (one per API key, as vLLM's
cache_salt) never share a page and a cache hit reveals nothing about another salt's
prompts. A new request reuses the longest run of registered pages matching its leading
tokens, shared read-only (refcount > 1); it only ever writes to pages past that prefix,
which it owns alone. A hit is confirmed by comparing the stored (parent hash, salt, token
ids) with the request's, never on the hash alone. Pages whose refcount drops to zero stay
registered and reusable until they are evicted, least recently released first, when free
pages run out.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from engine.core.request import Request

ROOT_HASH = b""   # the first page's parent for unsalted requests
_SALT_PERSON = b"ember.cacheSalt"   # BLAKE2b personalization: salts never hash like pages

# What a registered page is confirmed against: (hash, parent hash, cache salt, token ids).
PageKey = tuple[bytes, bytes, str | None, tuple[int, ...]]


def hash_page(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """Chained page hash: 128-bit BLAKE2b of the parent's hash and the int64 token ids.

    A cryptographic hash rather than Python's hash() so that a client cannot craft prompts
    whose pages collide with another tenant's (and it is stable across processes). The
    token comparison on every hit guards against collisions anyway.
    """
    payload = parent_hash + array("q", token_ids).tobytes()
    return hashlib.blake2b(payload, digest_size=16).digest()


def root_hash(cache_salt: str | None) -> bytes:
    """The parent hash of a request's first page: ROOT_HASH unsalted, else the salt's hash.

    Salting the root is enough: every later page's hash chains from it. A different
    BLAKE2b personalization keeps a salt's hash apart from any page's hash.
    """
    if cache_salt is None:
        return ROOT_HASH
    salt_bytes = cache_salt.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(salt_bytes, digest_size=16, person=_SALT_PERSON).digest()


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    """A run of registered pages matching a request's leading tokens."""

    pages: tuple[int, ...]
    hashes: tuple[bytes, ...]
    num_tokens: int        # len(pages) * page_size


@dataclass(slots=True)
class PrefixCacheStats:
    queried_tokens: int = 0   # tokens of admitted requests that looked up the cache
    hit_tokens: int = 0       # of those, tokens served from cached pages

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class PageManager:
    """Pages, page tables, reference counts and the prefix cache.

    Args:
      num_pages: pages in the KV cache, page 0 included (it is never handed out).
      page_size: token slots per page.
      enable_prefix_caching: register full pages and reuse them across requests.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: expected >= 2 (page 0 is reserved)")
        if page_size < 1:
            raise ValueError(f"page_size={page_size}: expected >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._ref_counts = [0] * num_pages
        # Unregistered pages with refcount 0; popped from the end, so low ids go first.
        self._free_pages = list(range(num_pages - 1, 0, -1))
        # Registered pages with refcount 0, least recently released first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_to_page: dict[bytes, int] = {}
        self._page_key: list[PageKey | None] = [None] * num_pages
        self._tables: dict[str, list[int]] = {}
        self._table_hashes: dict[str, list[bytes]] = {}   # hashes of committed full pages

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can take: empty ones plus evictable cached ones."""
        return len(self._free_pages) + len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        """Registered pages, in use or evictable."""
        return len(self._hash_to_page)

    @property
    def usage(self) -> float:
        """Fraction of usable pages held by requests (evictable cached pages count as free)."""
        return 1.0 - self.num_free_pages / self.num_usable_pages

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def page_table(self, request_id: str) -> list[int]:
        """A copy of the request's page table ([] when it holds no pages)."""
        return list(self._tables.get(request_id, ()))

    def ref_count(self, page: int) -> int:
        return self._ref_counts[page]

    def is_cached(self, page: int) -> bool:
        key = self._page_key[page]
        return key is not None and self._hash_to_page.get(key[0]) == page

    # ---- prefix cache --------------------------------------------------------------------

    def get_computed_prefix(self, request: Request) -> CachedPrefix:
        """The longest run of cached pages matching the request's leading tokens.

        At most (num_tokens - 1) // page_size pages, so at least one token is left to
        compute (its logits give the next token). Requests with skip_prefix_cache get no
        hit. Changes no state.
        """
        if not self.enable_prefix_caching or request.skip_prefix_cache:
            return CachedPrefix((), (), 0)
        pages: list[int] = []
        hashes: list[bytes] = []
        salt = request.cache_salt
        parent = root_hash(salt)
        for index in range((request.num_tokens - 1) // self.page_size):
            token_ids = tuple(self._page_token_ids(request, index))
            page_hash = hash_page(parent, token_ids)
            page = self._hash_to_page.get(page_hash)
            if page is None or self._page_key[page] != (page_hash, parent, salt, token_ids):
                break
            pages.append(page)
            hashes.append(page_hash)
            parent = page_hash
        return CachedPrefix(tuple(pages), tuple(hashes), len(pages) * self.page_size)

    def commit(self, request: Request, num_computed: int | None = None) -> None:
        """Register the request's pages that became full of computed tokens: of its first
        `num_computed` tokens (default all its computed ones; with a step in flight, the
        tokens known and computed so far)."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[request.request_id]
        hashes = self._table_hashes[request.request_id]
        num_computed = request.num_computed_tokens if num_computed is None else num_computed
        num_full = min(num_computed, request.num_tokens) // self.page_size
        num_full = min(num_full, len(table))
        for index in range(len(hashes), num_full):
            parent = hashes[-1] if hashes else root_hash(request.cache_salt)
            token_ids = tuple(self._page_token_ids(request, index))
            page_hash = hash_page(parent, token_ids)
            hashes.append(page_hash)
            # Same content already registered (two requests computed it at once), or a
            # collision: keep the registered page; this one stays private and unregistered.
            if page_hash not in self._hash_to_page:
                self._hash_to_page[page_hash] = table[index]
                self._page_key[table[index]] = (page_hash, parent, request.cache_salt,
                                                token_ids)

    def reset_prefix_cache(self) -> None:
        """Forget every registered page (the KV cache's contents were lost): no later request
        reuses them. Pages held by requests stay theirs; the others become free."""
        for page in self._hash_to_page.values():
            self._page_key[page] = None
            if self._ref_counts[page] == 0:
                self._free_pages.append(page)
        self._hash_to_page.clear()
        self._evictable.clear()

    def _page_token_ids(self, request: Request, index: int) -> list[int]:
        return request.token_ids_between(index * self.page_size, (index + 1) * self.page_size)

    # ---- allocation ----------------------------------------------------------------------

    def allocate(self, request: Request, num_new_tokens: int,
                 prefix: CachedPrefix | None = None) -> list[int] | None:
        """Grow the request's page table to cover its computed tokens plus num_new_tokens.

        Args:
          request: the request; its pages so far are those of earlier allocate() calls.
          num_new_tokens: tokens to be computed next.
          prefix: only on admission (the request holds no pages yet): the result of
            get_computed_prefix(request); its pages are shared and count as computed, so
            the table covers prefix.num_tokens + num_new_tokens. Records cache statistics.

        Returns:
          A copy of the full page table, or None when free pages are short. None changes
          nothing, which is the scheduler's cue to preempt or wait.
        """
        table = self._tables.get(request.request_id)
        if table is None:
            prefix = prefix or CachedPrefix((), (), 0)
            num_held, num_covered = len(prefix.pages), prefix.num_tokens
            self._check_prefix(prefix)
        elif prefix is not None:
            raise ValueError(f"request {request.request_id!r} already holds pages; "
                             "a prefix is only given on admission")
        else:
            num_held, num_covered = len(table), request.num_computed_tokens
        num_new_pages = self.pages_needed(num_covered + num_new_tokens) - num_held
        if table is not None and num_new_pages <= 0:
            return list(table)   # most decode steps: its last page has room
        # Evictable prefix pages are counted as free but are about to be taken back.
        reclaimed = 0 if table is not None else sum(
            1 for page in prefix.pages if self._ref_counts[page] == 0)
        if num_new_pages > self.num_free_pages - reclaimed:
            return None
        if table is None:
            table = self._admit(request, prefix)
        for _ in range(max(num_new_pages, 0)):
            table.append(self._take_free_page())
        return list(table)

    def free(self, request: Request) -> None:
        """Release the request's pages; registered ones stay cached until evicted."""
        table = self._tables.pop(request.request_id, None)
        self._table_hashes.pop(request.request_id, None)
        # Release the tail first so it is evicted first: a prefix's head pages are the ones
        # most likely to be shared by later requests.
        for page in reversed(table or ()):
            self._ref_counts[page] -= 1
            if self._ref_counts[page] > 0:
                continue
            if self.is_cached(page):
                self._evictable[page] = None
            else:
                self._page_key[page] = None
                self._free_pages.append(page)

    def _check_prefix(self, prefix: CachedPrefix) -> None:
        for page, page_hash in zip(prefix.pages, prefix.hashes):
            if self._hash_to_page.get(page_hash) != page:
                raise ValueError(f"stale prefix: page {page} is no longer cached")

    def _admit(self, request: Request, prefix: CachedPrefix) -> list[int]:
        if self.enable_prefix_caching and not request.skip_prefix_cache:
            self.stats.queried_tokens += request.num_tokens
            self.stats.hit_tokens += prefix.num_tokens
        for page in prefix.pages:
            if self._ref_counts[page] == 0:
                del self._evictable[page]
            self._ref_counts[page] += 1
        table = list(prefix.pages)
        self._tables[request.request_id] = table
        self._table_hashes[request.request_id] = list(prefix.hashes)
        return table

    def _take_free_page(self) -> int:
        if self._free_pages:
            page = self._free_pages.pop()
        else:
            page, _ = self._evictable.popitem(last=False)
            page_hash = self._page_key[page][0]
            del self._hash_to_page[page_hash]
            self._page_key[page] = None
        self._ref_counts[page] = 1
        return page
