"""Filter validation, serialization and matching semantics."""

from __future__ import annotations

import pytest

from hypertuna.protocol.nostr import (
    MAX_TIMESTAMP,
    Filter,
    NostrError,
    Prefix,
    parse_filter,
    serialize_filter,
)
from tests.protocol.nostr_keys import ALICE_PK, BOB, BOB_PK, T0, note

E1 = "e1" * 32
E2 = "e2" * 32


def reject(obj: object, *, max_values: int = 1000) -> str:
    with pytest.raises(NostrError) as info:
        parse_filter(obj, max_values=max_values)
    assert info.value.prefix is Prefix.INVALID
    assert info.value.sub_id is None
    assert info.value.event_id is None
    return info.value.text


# ---------------------------------------------------------------------------------- accepting


def test_full_filter() -> None:
    f = parse_filter(
        {
            "ids": [E1, E2, E1],
            "authors": [ALICE_PK],
            "kinds": [1, 0, 65535],
            "#t": ["nostr", "Nostr"],
            "#e": [E1],
            "#Z": [],
            "since": 0,
            "until": MAX_TIMESTAMP,
            "limit": 10,
        }
    )
    assert f == Filter(
        ids=frozenset({E1, E2}),
        authors=frozenset({ALICE_PK}),
        kinds=frozenset({0, 1, 65535}),
        tags=(("Z", frozenset()), ("e", frozenset({E1})), ("t", frozenset({"nostr", "Nostr"}))),
        since=0,
        until=MAX_TIMESTAMP,
        limit=10,
    )


def test_empty_filter_has_no_conditions() -> None:
    assert parse_filter({}) == Filter()


def test_limit_zero_is_valid() -> None:
    assert parse_filter({"limit": 0}).limit == 0


def test_max_values_is_inclusive() -> None:
    f = parse_filter({"kinds": [1, 2, 3], "#t": ["a", "b", "c"]}, max_values=3)
    assert f.kinds == frozenset({1, 2, 3})


def test_serialize_filter_is_the_inverse() -> None:
    obj = {
        "ids": [E1, E2],
        "authors": [ALICE_PK],
        "kinds": [0, 1],
        "#e": [E1],
        "#t": ["a", "b"],
        "since": 5,
        "until": 6,
        "limit": 0,
    }
    f = parse_filter(obj)
    assert serialize_filter(f) == obj
    assert parse_filter(serialize_filter(f)) == f


def test_serialize_filter_omits_absent_fields_and_keeps_empty_lists() -> None:
    assert serialize_filter(Filter()) == {}
    assert serialize_filter(parse_filter({"ids": [], "#p": []})) == {"ids": [], "#p": []}


# ---------------------------------------------------------------------------------- rejecting


@pytest.mark.parametrize("obj", [None, [], "{}", 1, [{}]])
def test_non_object_is_rejected(obj: object) -> None:
    assert reject(obj) == "filter must be a JSON object"


@pytest.mark.parametrize("key", ["search", "e", "#", "#ab", "#1", "#é", "##", "#_", "IDS", ""])
def test_unsupported_field(key: str) -> None:
    assert reject({key: []}) == f'unsupported filter field "{key}"'.replace("é", "\\u00e9")


def test_unsupported_field_name_is_quoted_short_and_ascii() -> None:
    text = reject({"x" * 500 + "\ud800": 1})
    assert len(text) < 100
    text.encode("ascii")


@pytest.mark.parametrize("key", ["ids", "authors"])
@pytest.mark.parametrize(
    "value",
    [
        None,
        E1,
        {"a": E1},
        [E1[:10]],  # prefixes are not allowed
        [E1.upper()],
        [E1 + "0"],
        [1],
        [None],
        [[E1]],
        [E1, 5],
    ],
)
def test_bad_hex_list(key: str, value: object) -> None:
    assert reject({key: value}) == (
        f'filter "{key}" must be a list of 64-character lowercase hex strings'
    )


@pytest.mark.parametrize("value", [None, 1, [True], [False], [-1], [65536], [1.0], ["1"], [[1]]])
def test_bad_kinds(value: object) -> None:
    assert reject({"kinds": value}) == 'filter "kinds" must be a list of integers from 0 to 65535'


@pytest.mark.parametrize("key", ["since", "until", "limit"])
@pytest.mark.parametrize("value", [True, False, -1, 1.0, 1e3, "5", None, [5], MAX_TIMESTAMP + 1])
def test_bad_integer_field(key: str, value: object) -> None:
    assert reject({key: value}) == f'filter "{key}" must be an integer from 0 to {MAX_TIMESTAMP}'


@pytest.mark.parametrize("value", [None, "x", [1], [None], [["x"]], ["ok", {}], ["\ud800"]])
def test_bad_tag_values(value: object) -> None:
    assert reject({"#t": value}) == 'filter "#t" must be a list of strings'


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ids", [E1] * 4),
        ("authors", [ALICE_PK] * 4),
        ("kinds", [1, 2, 3, 4]),
        ("#p", ["a", "b", "c", "d"]),
    ],
)
def test_lists_longer_than_max_values(key: str, value: list[object]) -> None:
    assert reject({key: value}, max_values=3) == f'filter "{key}" has more than 3 values'


def test_oversized_list_is_refused_before_its_items_are_checked() -> None:
    assert reject({"kinds": [None] * 5}, max_values=3) == 'filter "kinds" has more than 3 values'


# ----------------------------------------------------------------------------------- matching

EV = note("m", tags=[["e", E1], ["p", BOB_PK], ["t", "nostr"], ["t", "python"], ["title", "x"]])
BOB_EV = note("b", secret=BOB, kind=7, created_at=T0 + 10)


def matches(obj: dict[str, object], event: object = EV) -> bool:
    return parse_filter(obj).matches(event)  # type: ignore[arg-type]


def test_empty_filter_matches_everything() -> None:
    assert matches({})
    assert matches({}, BOB_EV)


def test_ids_and_authors_are_exact() -> None:
    assert matches({"ids": [EV.id]})
    assert not matches({"ids": [BOB_EV.id]})
    assert matches({"authors": [ALICE_PK, BOB_PK]})
    assert not matches({"authors": [BOB_PK]})


def test_kinds() -> None:
    assert matches({"kinds": [0, 1]})
    assert not matches({"kinds": [7]})
    assert matches({"kinds": [7]}, BOB_EV)


def test_since_and_until_are_inclusive() -> None:
    assert matches({"since": T0, "until": T0})
    assert not matches({"since": T0 + 1})
    assert not matches({"until": T0 - 1})
    assert matches({"since": T0 + 10}, BOB_EV)


def test_tags_or_within_a_letter_and_across_letters() -> None:
    assert matches({"#t": ["rust", "python"]})
    assert matches({"#e": [E1], "#p": [BOB_PK], "#t": ["nostr"]})
    assert not matches({"#e": [E1], "#p": [ALICE_PK]})
    assert not matches({"#t": ["Nostr"]})  # values are compared exactly
    assert not matches({"#e": [E2]})
    # Only single-letter tags are indexed; "title" is not "#t".
    assert not matches({"#t": ["x"]})


def test_tag_filter_does_not_match_an_event_without_that_tag() -> None:
    assert not matches({"#e": [E1]}, BOB_EV)


def test_all_conditions_must_hold() -> None:
    assert matches({"authors": [ALICE_PK], "kinds": [1], "#t": ["nostr"], "since": T0})
    assert not matches({"authors": [ALICE_PK], "kinds": [7]})


@pytest.mark.parametrize("obj", [{"ids": []}, {"authors": []}, {"kinds": []}, {"#t": []}])
def test_empty_lists_match_nothing(obj: dict[str, object]) -> None:
    f = parse_filter(obj)
    assert not f.matches(EV)
    assert not f.matches(BOB_EV)
    assert not f.can_match


def test_limit_plays_no_part_in_matching() -> None:
    assert matches({"limit": 0})
    assert parse_filter({"limit": 0}).can_match
