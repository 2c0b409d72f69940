"""ListingGuard: no page served twice (however the loop is spelled), a page bound per listing."""

from __future__ import annotations

import pytest

from worker.client import ListingGuard
from worker.errors import ListingRefused

FIRST = "/v1/Services/IS1/Users/US1/Conversations?PageSize=50"


def page(n: int, token: str | None = None) -> str:
    return f"{FIRST}&Page={n}&PageToken={token or f'PT{n}'}"


def test_a_listing_of_distinct_pages_is_walked() -> None:
    guard = ListingGuard(max_pages=4)
    for path in (FIRST, page(1), page(2), page(3)):
        guard.check(path)


@pytest.mark.parametrize(
    "again",
    [
        FIRST,  # A -> B -> A
        FIRST + "&Page=0",  # the first page as its meta.url spells it
        "/v1/Services/IS1/Users/US1/Conversations?Page=0&PageSize=50",  # reordered
        page(1),  # B again
        page(7, "PT1"),  # B's token under another page number
        page(1).replace("PageSize=50", "PageSize=50&x=1").replace("Page=1", "Page=9"),
    ],
)
def test_any_repeat_of_an_earlier_page_is_refused(again: str) -> None:
    guard = ListingGuard(max_pages=100)
    guard.check(FIRST)
    guard.check(page(1))
    guard.check(page(2))
    with pytest.raises(ListingRefused, match="repeats a page it already served"):
        guard.check(again)


def test_the_page_bound_counts_pages_committed_before_a_resume() -> None:
    guard = ListingGuard(max_pages=5, served=3)
    guard.check(page(3))
    guard.check(page(4))
    with pytest.raises(ListingRefused, match=r"past CONVSYNC_MAX_PAGES \(5\)"):
        guard.check(page(5))


@pytest.mark.parametrize("again", [FIRST, FIRST + "&Page=0"])
def test_a_first_page_whose_next_page_is_itself_is_refused(again: str) -> None:
    """The first page is digested only when a second comes: that second may be the first."""
    guard = ListingGuard(max_pages=100)
    guard.check(FIRST)
    with pytest.raises(ListingRefused, match="repeats a page it already served"):
        guard.check(again)


def test_a_walk_of_one_page_counts_it_against_the_bound() -> None:
    guard = ListingGuard(max_pages=1)
    guard.check(FIRST)
    with pytest.raises(ListingRefused, match=r"past CONVSYNC_MAX_PAGES \(1\)"):
        guard.check(page(1))


def test_a_resumed_walk_refuses_its_first_page_again() -> None:
    guard = ListingGuard(max_pages=100, served=3)
    guard.check(page(3))
    with pytest.raises(ListingRefused, match="repeats a page it already served"):
        guard.check(page(3))
