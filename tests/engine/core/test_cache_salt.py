"""The prefix cache partitioned by cache_salt: same salt shares pages, different salts never
do (so cached_tokens reveals nothing about another key's prompts), even when page hashes
collide; the hit statistics count what was served.
"""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core import page_manager
from engine.core.page_manager import ROOT_HASH, PageManager, hash_page, root_hash
from engine.core.request import Request
from engine.core.scheduler import Scheduler
from tests.engine.core.test_scheduler import FakeRunner, _config, _request, _run, _tokens

PAGE_SIZE = 4


def _serve_one_by_one(requests, **config):
    """Each request runs alone to the end, so it finds every page the earlier ones left."""
    scheduler = Scheduler(_config(page_size=PAGE_SIZE, num_pages=512, **config))
    runner = FakeRunner(scheduler)
    for request in requests:
        scheduler.add_request(request)
        _run(scheduler, runner)
    assert scheduler.page_manager.num_free_pages == 511
    return scheduler


def _full_pages_in_common(a, b):
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    return common // PAGE_SIZE * PAGE_SIZE


@pytest.mark.parametrize("first_salt, second_salt, cached", [
    (None, None, 8), ("k1", "k1", 8), ("k1", "k2", 0), (None, "k1", 0), ("k1", None, 0),
    ("k1", "k10", 0), ("\ud800", "\ud800", 8), ("\ud800", "\udc00", 0)])
def test_same_salt_hits_and_another_salt_never_does(rng, first_salt, second_salt, cached):
    prompt = _tokens(rng, 10)
    first = _request("first", prompt, max_tokens=2, cache_salt=first_salt)
    second = _request("second", prompt, max_tokens=2, cache_salt=second_salt)
    scheduler = _serve_one_by_one([first, second])
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, cached)
    assert first.output_token_ids == second.output_token_ids
    stats = scheduler.stats()
    assert stats.prefix_cache_hit_tokens == cached
    assert stats.prefix_cache_queried_tokens == 20
    assert stats.prefix_cache_hit_rate == pytest.approx(cached / 20)


@settings(max_examples=60, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1),
       salts=st.lists(st.sampled_from([None, "k1", "k2", "org-3"]), min_size=2, max_size=12))
def test_cached_tokens_are_exactly_the_pages_in_common_with_the_same_salt(seed, salts):
    rng = random.Random(seed)
    stems = [_tokens(rng, 16) for _ in range(2)]
    requests = []
    for index, salt in enumerate(salts):
        prompt = rng.choice(stems)[:rng.randrange(1, 17)] + _tokens(rng, rng.randrange(0, 5))
        # max_tokens=1: only the prompt is ever fed, so only prompt pages are cached.
        requests.append(_request(f"r{index}", prompt, max_tokens=1, cache_salt=salt))
    scheduler = _serve_one_by_one(requests)
    for index, request in enumerate(requests):
        same_salt = [r.prompt_token_ids for r in requests[:index]
                     if r.cache_salt == request.cache_salt]
        limit = (request.num_prompt_tokens - 1) // PAGE_SIZE * PAGE_SIZE
        expected = max([_full_pages_in_common(request.prompt_token_ids, p)
                        for p in same_salt], default=0)
        assert request.num_cached_tokens == min(expected, limit)
    stats = scheduler.stats()
    assert stats.prefix_cache_hit_tokens == sum(r.num_cached_tokens for r in requests)
    assert stats.prefix_cache_queried_tokens == sum(r.num_prompt_tokens for r in requests)


def test_colliding_hashes_never_cross_salts(rng, monkeypatch):
    # Every page hashes alike: only the confirmed (parent, salt, token ids) keeps them apart.
    monkeypatch.setattr(page_manager, "hash_page", lambda parent, token_ids: b"collide")
    monkeypatch.setattr(page_manager, "root_hash", lambda salt: ROOT_HASH)
    manager = PageManager(num_pages=16, page_size=PAGE_SIZE)
    prompt = _tokens(rng, 9)
    owner = Request("owner", prompt, cache_salt="k1")
    table = manager.allocate(owner, 9, manager.get_computed_prefix(owner))
    owner.num_computed_tokens = 9
    manager.commit(owner)
    assert manager.is_cached(table[0])
    for salt in ("k2", None):
        other = Request(f"other-{salt}", prompt, cache_salt=salt)
        assert manager.get_computed_prefix(other).num_tokens == 0
    same = Request("same", prompt, cache_salt="k1")
    assert manager.get_computed_prefix(same).pages == (table[0],)


def test_root_hash_is_the_unsalted_root_only_for_none():
    salts = [None, "k1", "k2", "1", "\ud800"]
    roots = [root_hash(salt) for salt in salts]
    assert roots[0] == ROOT_HASH and len(set(roots)) == len(salts)
    assert root_hash("k1") == root_hash("k1")   # stable across calls and processes
    # A salt never hashes like a page whose parent is the unsalted root.
    assert root_hash("k1") != hash_page(ROOT_HASH, [])


@pytest.mark.parametrize("field, value, message", [
    ("tenant", None, "tenant=None: expected a str"),
    ("tenant", 17, "tenant=17: expected a str"),
    ("cache_salt", "", "cache_salt='': expected a non-empty str or None"),
    ("cache_salt", 17, "cache_salt=17: expected a non-empty str or None"),
    ("cache_salt", b"k1", "cache_salt=b'k1': expected a non-empty str or None"),
])
def test_bad_tenant_or_salt_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        Request("r", [1, 2], **{field: value})


@pytest.fixture
def rng():
    return random.Random(77)
