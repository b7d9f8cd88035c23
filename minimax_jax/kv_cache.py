"""Paged KV cache bookkeeping (one allocator per dp rank): which pages a sequence owns, and the
prefix cache that lets a new sequence start on pages an earlier one computed.

The cache arrays themselves are created by `model.init_kv_cache` and live on device; this module
only decides which pages a sequence holds.

Prefix caching is page-granular: a full page is known by its tokens and the page before it (a
chain of keys, as sglang's radix tree and vLLM's block hashes know a prefix), so a prompt that
begins with the tokens of pages an earlier sequence computed takes those pages instead of
computing them again. Pages are reference-counted; a cached page no sequence holds stays in the
cache, least recently released first out, until an allocation needs it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict


class OutOfPages(RuntimeError):
    pass


class PageAllocator:
    """num_pages pages, handed out by `allocate` and given back by `free`. With page_size, full
    pages given to `remember` are kept for `match` (prefix caching)."""

    def __init__(self, num_pages: int, page_size: int | None = None):
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))   # pop() hands out low ids first
        self._refs: dict[int, int] = {}                    # pages some sequence holds
        self._page_of: dict[tuple, int] = {}               # (parent node, page tokens) -> page
        self._key_of: dict[int, tuple] = {}                # cached page -> its key
        self._node_of: dict[int, int] = {}                 # cached page -> node id, unique for ever
        self._unheld: OrderedDict[int, None] = OrderedDict()   # cached pages no sequence holds, LRU first
        self._nodes = itertools.count(1)                   # 0: the root, before a sequence's first page

    @property
    def prefix_caching(self) -> bool:
        return self.page_size is not None

    @property
    def num_free(self) -> int:
        """Pages an allocation may take: free ones and cached ones no sequence holds."""
        return len(self._free) + len(self._unheld)

    @property
    def num_used(self) -> int:
        """Pages some sequence holds."""
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        return len(self._key_of)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfPages(f"asked for {n} pages, {self.num_free} free")
        pages = [self._free.pop() if self._free else self._evict_oldest() for _ in range(n)]
        for page in pages:
            self._refs[page] = 1
        return pages

    def free(self, pages: list[int]) -> None:
        """Gives back one hold of each page. A cached page nobody holds any more stays cached;
        the last pages of a sequence go first (they are released as older), so a prefix outlives
        its continuations."""
        for page in reversed(pages):
            held = self._refs[page] - 1
            if held:
                self._refs[page] = held
                continue
            del self._refs[page]
            if page in self._key_of:
                self._unheld[page] = None
            else:
                self._free.append(page)

    def cached(self, tokens: list[int], max_pages: int) -> list[int]:
        """The cached pages that hold tokens' first full pages, up to max_pages of them (not held)."""
        if not self.prefix_caching:
            return []
        pages, parent = [], 0
        for start in range(0, min(max_pages, len(tokens) // self.page_size) * self.page_size, self.page_size):
            page = self._page_of.get((parent, tuple(tokens[start:start + self.page_size])))
            if page is None:
                break
            pages.append(page)
            parent = self._node_of[page]
        return pages

    def match(self, tokens: list[int], max_pages: int) -> list[int]:
        """`cached`, each page now held once more (give them back with `free`)."""
        pages = self.cached(tokens, max_pages)
        for page in pages:
            self._refs[page] = self._refs.get(page, 0) + 1
            self._unheld.pop(page, None)
        return pages

    def remember(self, tokens: list[int], pages: list[int]) -> None:
        """Caches the full pages of a sequence whose first len(tokens) tokens' keys and values
        are written (or are being written by a step in flight) in `pages`. A page whose tokens
        are cached already in another page stays uncached: its sequence frees it as usual."""
        if not self.prefix_caching:
            return
        parent = 0
        for i in range(min(len(tokens) // self.page_size, len(pages))):
            key = (parent, tuple(tokens[i * self.page_size:(i + 1) * self.page_size]))
            page = self._page_of.get(key)
            if page is None and pages[i] not in self._key_of:
                page = pages[i]
                self._page_of[key], self._key_of[page], self._node_of[page] = page, key, next(self._nodes)
            if page is None:        # this page caches another prefix: the chain stops here
                return
            parent = self._node_of[page]

    def flush(self) -> int:
        """Drops every cached page no sequence holds; returns how many."""
        dropped = len(self._unheld)
        while self._unheld:
            self._free.append(self._evict_oldest())
        return dropped

    def _evict_oldest(self) -> int:
        page, _ = self._unheld.popitem(last=False)
        del self._page_of[self._key_of.pop(page)]
        del self._node_of[page]
        return page
