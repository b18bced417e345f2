"""PageManager: allocation, reference counts, prefix cache hits, collisions, LRU eviction."""

import random

import pytest

from engine.core import page_manager
from engine.core.page_manager import PageManager
from engine.core.request import Request
from engine.sampling_params import SamplingParams


def _request(request_id, token_ids, **params):
    return Request(request_id, list(token_ids), SamplingParams(**params))


def _compute(manager, request, num_tokens):
    """What the scheduler and runner do for one chunk: allocate, compute, commit."""
    table = manager.allocate(request, num_tokens)
    assert table is not None
    request.num_computed_tokens += num_tokens
    manager.commit(request)
    return table


def _admit(manager, request, num_tokens=None):
    prefix = manager.get_computed_prefix(request)
    if num_tokens is None:
        num_tokens = request.num_tokens - prefix.num_tokens
    table = manager.allocate(request, num_tokens, prefix)
    assert table is not None
    request.num_computed_tokens = prefix.num_tokens + num_tokens
    manager.commit(request)
    return prefix, table


@pytest.fixture
def rng():
    return random.Random(1234)


def _tokens(rng, n):
    return [rng.randrange(1, 50_000) for _ in range(n)]


def test_allocate_covers_tokens_and_never_hands_out_page_zero(rng):
    manager = PageManager(num_pages=9, page_size=4)
    request = _request("a", _tokens(rng, 13))
    table = _compute(manager, request, 13)
    assert len(table) == 4 and 0 not in table and len(set(table)) == 4
    assert manager.num_free_pages == 8 - 4
    assert manager.usage == pytest.approx(4 / 8)
    # Decoding within the last page takes nothing; crossing a boundary takes one page.
    request.output_token_ids += _tokens(rng, 3)
    assert _compute(manager, request, 3) == table
    request.output_token_ids += _tokens(rng, 1)
    grown = _compute(manager, request, 1)
    assert grown[:4] == table and len(grown) == 5 and 0 not in grown


def test_allocate_returns_none_without_any_state_change(rng):
    manager = PageManager(num_pages=5, page_size=4)
    first = _request("a", _tokens(rng, 8))
    _compute(manager, first, 8)
    second = _request("b", _tokens(rng, 20))
    prefix = manager.get_computed_prefix(second)
    free_before = manager.num_free_pages
    assert manager.allocate(second, 20, prefix) is None
    assert manager.num_free_pages == free_before
    assert manager.page_table("b") == []
    assert manager.stats.queried_tokens == 8   # only the admitted request was counted
    assert manager.allocate(second, 8, prefix) is not None   # two pages do fit


def test_prefix_hit_reuses_full_pages_only_and_leaves_a_token_to_compute(rng):
    manager = PageManager(num_pages=32, page_size=4)
    shared = _tokens(rng, 10)
    first = _request("a", shared)
    _, first_table = _admit(manager, first)

    extending = _request("b", shared[:9] + _tokens(rng, 5))
    prefix, table = _admit(manager, extending)
    assert prefix.num_tokens == 8                      # two full pages, not the partial one
    assert table[:2] == first_table[:2] and table[2] not in first_table
    assert manager.ref_count(first_table[0]) == 2

    # A prompt identical to a cached one still computes its last token.
    same = _request("c", shared[:8])
    prefix, _ = _admit(manager, same)
    assert prefix.num_tokens == 4
    assert manager.stats.hit_tokens == 12
    assert manager.stats.hit_rate == pytest.approx(12 / (10 + 14 + 8))


def test_pages_register_only_once_full_and_computed(rng):
    manager = PageManager(num_pages=16, page_size=4)
    tokens = _tokens(rng, 12)
    first = _request("a", tokens)
    _compute(manager, first, 3)   # page 0 allocated but not full
    assert manager.get_computed_prefix(_request("b", tokens)).num_tokens == 0
    _compute(manager, first, 3)   # page 0 full, page 1 half
    assert manager.get_computed_prefix(_request("b", tokens)).num_tokens == 4
    _compute(manager, first, 6)
    assert manager.get_computed_prefix(_request("b", tokens)).num_tokens == 8  # not 12
    assert manager.num_cached_pages == 3


def test_hash_collision_is_rejected_on_token_mismatch(rng, monkeypatch):
    monkeypatch.setattr(page_manager, "hash_page", lambda parent, token_ids: b"same")
    manager = PageManager(num_pages=16, page_size=4)
    first = _request("a", _tokens(rng, 9))
    _admit(manager, first)
    assert manager.num_cached_pages == 1   # page 1 collides with page 0: not registered
    other = _request("b", _tokens(rng, 9))
    prefix, table = _admit(manager, other)
    assert prefix.num_tokens == 0
    assert not set(table) & set(manager.page_table("a"))
    # The genuine content still hits.
    again = _request("c", first.prompt_token_ids)
    assert manager.get_computed_prefix(again).num_tokens == 4


def test_prompt_logprobs_requests_get_no_hit(rng):
    manager = PageManager(num_pages=16, page_size=4)
    tokens = _tokens(rng, 9)
    _admit(manager, _request("a", tokens))
    scoring = _request("b", tokens, prompt_logprobs=0)
    assert manager.get_computed_prefix(scoring).num_tokens == 0


def test_skip_prefix_cache_requests_get_no_hit_and_leave_the_hit_rate_alone(rng):
    manager = PageManager(num_pages=16, page_size=4)
    tokens = _tokens(rng, 9)
    _admit(manager, _request("a", tokens))
    queried = manager.stats.queried_tokens
    private = Request("b", list(tokens), SamplingParams(), skip_prefix_cache=True)
    prefix, _ = _admit(manager, private)
    assert prefix.num_tokens == 0
    assert manager.stats.queried_tokens == queried
    assert manager.get_computed_prefix(_request("c", tokens)).num_tokens == 8


def test_free_keeps_computed_pages_cached_and_hits_revive_them(rng):
    manager = PageManager(num_pages=8, page_size=4)
    tokens = _tokens(rng, 10)
    first = _request("a", tokens)
    _, table = _admit(manager, first)
    manager.free(first)
    assert manager.num_free_pages == 7            # cached pages count as free
    assert [manager.ref_count(p) for p in table] == [0, 0, 0]
    second = _request("b", tokens)
    prefix, second_table = _admit(manager, second)
    assert prefix.pages == tuple(table[:2])
    assert second_table[:2] == table[:2]
    assert manager.num_free_pages == 7 - 3


def test_lru_eviction_takes_least_recently_released_and_tail_pages_first(rng):
    manager = PageManager(num_pages=7, page_size=2)   # 6 usable pages
    prompts = {name: _tokens(rng, 5) for name in "abc"}
    requests = {name: _request(name, prompts[name]) for name in "abc"}
    for name in "abc":
        _compute(manager, requests[name], 4)   # two full cached pages each
    for name in "acb":
        manager.free(requests[name])
    assert manager.num_free_pages == 6 and manager.num_cached_pages == 6

    def cached_tokens(name):
        return manager.get_computed_prefix(_request("probe", prompts[name])).num_tokens

    # A hit takes c's pages out of the LRU order; it needs one new page: a's tail goes.
    reader = _request("reader", prompts["c"])
    _admit(manager, reader, num_tokens=1)
    assert [cached_tokens(n) for n in "abc"] == [2, 4, 4]
    manager.free(reader)   # c's pages are now the most recently released
    filler = _request("filler", _tokens(rng, 12))
    _compute(manager, filler, 2)              # reuses the reader's unregistered page
    assert [cached_tokens(n) for n in "abc"] == [2, 4, 4]
    _compute(manager, filler, 2)
    assert [cached_tokens(n) for n in "abc"] == [0, 4, 4]
    _compute(manager, filler, 2)              # b's tail before its head
    assert [cached_tokens(n) for n in "abc"] == [0, 2, 4]
    _compute(manager, filler, 2)
    assert [cached_tokens(n) for n in "abc"] == [0, 0, 4]


def test_refcounts_follow_sharing_and_never_go_negative(rng):
    manager = PageManager(num_pages=16, page_size=4)
    tokens = _tokens(rng, 12)
    owners = [_request(f"r{i}", tokens) for i in range(3)]
    tables = [_admit(manager, r)[1] for r in owners]
    shared = tables[0][:2]
    assert all(t[:2] == shared for t in tables)
    assert [manager.ref_count(p) for p in shared] == [3, 3]
    for request in owners:
        manager.free(request)
        manager.free(request)   # a second free is a no-op
    assert all(manager.ref_count(p) == 0 for p in range(16))
    assert manager.num_free_pages == 15


def test_stale_prefix_is_refused(rng):
    manager = PageManager(num_pages=4, page_size=2)
    tokens = _tokens(rng, 5)
    first = _request("a", tokens)
    _compute(manager, first, 4)
    manager.free(first)
    prefix = manager.get_computed_prefix(_request("b", tokens))
    assert prefix.num_tokens == 4
    hog = _request("hog", _tokens(rng, 6))
    _compute(manager, hog, 6)                 # evicts both cached pages
    with pytest.raises(ValueError, match="stale prefix"):
        manager.allocate(_request("b", tokens), 1, prefix)


@pytest.mark.parametrize("num_pages, page_size", [(1, 4), (8, 0)])
def test_bad_sizes_are_named(num_pages, page_size):
    with pytest.raises(ValueError, match="num_pages|page_size"):
        PageManager(num_pages, page_size)
