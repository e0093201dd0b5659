"""Client and relay messages: parsing, serialization and the ids carried by errors."""

from __future__ import annotations

import json

import pytest

from hypertuna.protocol.nostr import (
    AuthMessage,
    ClientMessage,
    CloseMessage,
    CountMessage,
    EventMessage,
    Filter,
    NostrError,
    Prefix,
    RelayAuth,
    RelayClosed,
    RelayCount,
    RelayEose,
    RelayEvent,
    RelayMessage,
    RelayNotice,
    RelayOk,
    ReqMessage,
    event_frame,
    parse_client_message,
    parse_relay_message,
    serialize_client_message,
    serialize_relay_message,
)
from tests.protocol.nostr_keys import ALICE_PK, as_json, note

EV = note("héllo 🤙", tags=[["t", "x"]])
AUTH_EV = note("", kind=22242, tags=[["relay", "wss://r.example"], ["challenge", "c"]])


def client_error(text: str | bytes, **limits: int) -> NostrError:
    with pytest.raises(NostrError) as info:
        parse_client_message(text, **limits)
    assert info.value.prefix is Prefix.INVALID
    return info.value


def relay_error(text: str | bytes) -> NostrError:
    with pytest.raises(NostrError) as info:
        parse_relay_message(text)
    assert info.value.prefix is Prefix.INVALID
    return info.value


def frame(*items: object) -> str:
    return json.dumps(list(items))


# ------------------------------------------------------------------------- client: accepting


def test_event_message() -> None:
    msg = parse_client_message('["EVENT",' + EV.raw + "]")
    assert msg == EventMessage(EV)
    assert isinstance(msg, EventMessage)
    assert msg.event.raw == EV.raw


def test_event_message_from_utf8_bytes_with_whitespace() -> None:
    text = ' [ "EVENT" , ' + json.dumps(as_json(EV), indent=2) + " ]\n"
    msg = parse_client_message(text.encode("utf-8"))
    assert msg == EventMessage(EV)
    assert msg.event.raw == EV.raw


def test_auth_message() -> None:
    assert parse_client_message(frame("AUTH", as_json(AUTH_EV))) == AuthMessage(AUTH_EV)


def test_req_message() -> None:
    msg = parse_client_message(frame("REQ", "sub 1", {"kinds": [1]}, {"authors": [ALICE_PK]}))
    assert msg == ReqMessage(
        "sub 1", (Filter(kinds=frozenset({1})), Filter(authors=frozenset({ALICE_PK})))
    )


def test_count_message() -> None:
    msg = parse_client_message(frame("COUNT", "c", {}))
    assert msg == CountMessage("c", (Filter(),))


def test_close_message() -> None:
    assert parse_client_message(frame("CLOSE", "sub 1")) == CloseMessage("sub 1")


def test_sub_id_length_limit_is_inclusive_and_configurable() -> None:
    assert parse_client_message(frame("CLOSE", "s" * 64)) == CloseMessage("s" * 64)
    assert parse_client_message(frame("CLOSE", "é" * 8), max_sub_id_length=8) == CloseMessage(
        "é" * 8
    )


def test_max_filters_is_inclusive() -> None:
    msg = parse_client_message(frame("REQ", "s", {}, {}), max_filters=2)
    assert isinstance(msg, ReqMessage)
    assert len(msg.filters) == 2


def test_max_filter_values_is_passed_on() -> None:
    assert isinstance(
        parse_client_message(frame("REQ", "s", {"kinds": [1, 2]}), max_filter_values=2),
        ReqMessage,
    )
    err = client_error(frame("REQ", "s", {"kinds": [1, 2, 3]}), max_filter_values=2)
    assert err.text == 'filter "kinds" has more than 2 values'
    assert err.sub_id == "s"


# -------------------------------------------------------------------------- client: refusing


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[",
        '["REQ","s",{}',
        "['REQ']",
        '["REQ","s",{}]x',
        "[NaN]",
        '["REQ","s",{"limit":NaN}]',
        '["REQ","s",{"limit":Infinity}]',
        '["REQ","s",{"limit":-Infinity}]',
        '["REQ","s",{"limit":' + "9" * 5000 + "}]",
        "[" * 100_000 + "]" * 100_000,
        '\ufeff["CLOSE","s"]',
        '["CLOSE","a\x01b"]',  # raw control characters are not allowed inside JSON strings
    ],
)
def test_malformed_json(text: str) -> None:
    err = client_error(text)
    assert err.text == "malformed JSON"
    assert (err.event_id, err.sub_id) == (None, None)


def test_bytes_must_be_utf8() -> None:
    assert client_error(b'["CLOSE","\xff"]').text == "message is not valid UTF-8"
    assert client_error('["CLOSE","s"]'.encode("utf-16")).text == "message is not valid UTF-8"


@pytest.mark.parametrize("text", ["[]", "{}", '"REQ"', "1", "null", '{"REQ": 1}'])
def test_not_a_non_empty_array(text: str) -> None:
    assert client_error(text).text == "message must be a non-empty JSON array"


@pytest.mark.parametrize("text", ["[1]", "[null]", '[["REQ"]]', '[{"a":1}, "s"]'])
def test_type_not_a_string(text: str) -> None:
    assert client_error(text).text == "message type must be a string"


@pytest.mark.parametrize("verb", ["FOO", "req", "EOSE", "OK", "NOTICE", ""])
def test_unknown_message_type(verb: str) -> None:
    assert client_error(frame(verb, "s", {})).text == f'unknown message type "{verb}"'


def test_unknown_message_type_text_is_bounded_and_sendable() -> None:
    err = client_error(frame("X" * 1000 + "\ud800"))
    assert len(str(err)) < 100
    str(err).encode("ascii")


@pytest.mark.parametrize("verb", ["EVENT", "AUTH"])
@pytest.mark.parametrize("extra", [(), (1,), ("x", "y")])
def test_event_and_auth_arity(verb: str, extra: tuple[object, ...]) -> None:
    items = [verb, as_json(EV), *extra] if extra else [verb]
    err = client_error(frame(*items))
    assert err.text == f'{verb} message must be ["{verb}", <event>]'
    assert err.event_id is None


@pytest.mark.parametrize("verb", ["EVENT", "AUTH"])
def test_bad_event_carries_its_id(verb: str) -> None:
    obj = as_json(EV)
    obj["content"] = "changed"
    err = client_error(frame(verb, obj))
    assert str(err) == "invalid: event id does not match its content"
    assert err.event_id == EV.id
    assert err.sub_id is None


def test_bad_event_with_bad_id_carries_no_id() -> None:
    obj = as_json(EV)
    obj["id"] = EV.id.upper()
    err = client_error(frame("EVENT", obj))
    assert err.event_id is None


def test_event_created_at_as_json_float_is_rejected() -> None:
    for number in ["1e9", "1700000000.0", "1.7e9"]:
        text = (
            '["EVENT",'
            + EV.raw.replace(f'"created_at":{EV.created_at}', '"created_at":' + number)
            + "]"
        )
        assert text != '["EVENT",' + EV.raw + "]"
        err = client_error(text)
        assert err.text == "created_at must be an integer"
        assert err.event_id == EV.id


@pytest.mark.parametrize("verb", ["REQ", "COUNT", "CLOSE"])
@pytest.mark.parametrize("sub_id", [None, 1, "", "s" * 65, ["s"], {"s": 1}, "x\ud800"])
def test_invalid_sub_id_is_not_echoed(verb: str, sub_id: object) -> None:
    err = client_error(frame(verb, sub_id, {}))
    assert err.text == "subscription id must be a string of 1 to 64 characters"
    assert err.sub_id is None


@pytest.mark.parametrize("verb", ["REQ", "COUNT", "CLOSE"])
def test_missing_sub_id(verb: str) -> None:
    err = client_error(frame(verb))
    assert err.text == f"{verb} message has no subscription id"
    assert err.sub_id is None


def test_configured_sub_id_length() -> None:
    err = client_error(frame("REQ", "abcd", {}), max_sub_id_length=3)
    assert err.text == "subscription id must be a string of 1 to 3 characters"
    assert err.sub_id is None


@pytest.mark.parametrize("verb", ["REQ", "COUNT"])
def test_no_filter(verb: str) -> None:
    err = client_error(frame(verb, "s"))
    assert err.text == f"{verb} message needs at least one filter"
    assert err.sub_id == "s"


@pytest.mark.parametrize("verb", ["REQ", "COUNT"])
def test_too_many_filters(verb: str) -> None:
    err = client_error(frame(verb, "s", {}, {}, {}), max_filters=2)
    assert err.text == "too many filters (at most 2)"
    assert err.sub_id == "s"


@pytest.mark.parametrize("verb", ["REQ", "COUNT"])
@pytest.mark.parametrize(
    ("bad", "text"),
    [
        ({"search": "x"}, 'unsupported filter field "search"'),
        ({"kinds": [True]}, 'filter "kinds" must be a list of integers from 0 to 65535'),
        ("all", "filter must be a JSON object"),
        (None, "filter must be a JSON object"),
    ],
)
def test_bad_filter_carries_sub_id(verb: str, bad: object, text: str) -> None:
    err = client_error(frame(verb, "s", {}, bad))
    assert err.text == text
    assert err.sub_id == "s"
    assert err.event_id is None


def test_close_with_extra_elements_carries_sub_id() -> None:
    err = client_error(frame("CLOSE", "s", "t"))
    assert err.text == 'CLOSE message must be ["CLOSE", <subscription id>]'
    assert err.sub_id == "s"


# ------------------------------------------------------------------ client: serializing


@pytest.mark.parametrize(
    ("msg", "text"),
    [
        (EventMessage(EV), '["EVENT",' + EV.raw + "]"),
        (AuthMessage(AUTH_EV), '["AUTH",' + AUTH_EV.raw + "]"),
        (CloseMessage("sü b"), '["CLOSE","sü b"]'),
        (
            ReqMessage(
                "s",
                (
                    Filter(kinds=frozenset({7, 1}), limit=0),
                    Filter(tags=(("e", frozenset({"b", "a"})),), since=3, until=4),
                ),
            ),
            '["REQ","s",{"kinds":[1,7],"limit":0},{"#e":["a","b"],"since":3,"until":4}]',
        ),
        (CountMessage("c", (Filter(),)), '["COUNT","c",{}]'),
    ],
)
def test_serialize_client_message(msg: ClientMessage, text: str) -> None:
    assert serialize_client_message(msg) == text
    assert parse_client_message(text) == msg


# ------------------------------------------------------------------------------- relay side

RELAY_CASES: list[tuple[RelayMessage, str]] = [
    (RelayEvent("sub", EV), '["EVENT","sub",' + EV.raw + "]"),
    (RelayOk(EV.id, True, ""), f'["OK","{EV.id}",true,""]'),
    (
        RelayOk(EV.id, False, "blocked: read-only while workers are offline"),
        f'["OK","{EV.id}",false,"blocked: read-only while workers are offline"]',
    ),
    (RelayEose("sub"), '["EOSE","sub"]'),
    (RelayClosed("sub", "error: shutting down"), '["CLOSED","sub","error: shutting down"]'),
    (RelayNotice('ça "quote"\n'), '["NOTICE","ça \\"quote\\"\\n"]'),
    (RelayCount("sub", 42), '["COUNT","sub",{"count":42}]'),
    (RelayAuth("challenge-é"), '["AUTH","challenge-é"]'),
]


@pytest.mark.parametrize(("msg", "text"), RELAY_CASES)
def test_relay_message_round_trip(msg: RelayMessage, text: str) -> None:
    assert serialize_relay_message(msg) == text
    assert parse_relay_message(text) == msg
    assert parse_relay_message(text.encode("utf-8")) == msg


def test_event_frame_splices_raw_without_reencoding() -> None:
    # A deliberately non-canonical raw text proves the event is copied, not re-encoded.
    assert event_frame('s"ü', '{"any": "text"}') == '["EVENT","s\\"ü",{"any": "text"}]'
    assert serialize_relay_message(RelayEvent("q", EV)) == event_frame("q", EV.raw)


def test_relay_count_ignores_extra_result_keys() -> None:
    msg = parse_relay_message('["COUNT","s",{"count":3,"approximate":true}]')
    assert msg == RelayCount("s", 3)


def test_relay_event_is_verified() -> None:
    obj = as_json(EV)
    obj["sig"] = "0" * 128
    err = relay_error(frame("EVENT", "sub", obj))
    assert err.text == "bad signature"
    assert err.event_id == EV.id


@pytest.mark.parametrize(
    ("items", "text"),
    [
        (["EVENT", "sub"], 'EVENT message must be ["EVENT", <subscription id>, <event>]'),
        (["EVENT", "", {}], "subscription id must be a non-empty string"),
        (["EVENT", "sub", []], "event must be a JSON object"),
        (["OK", EV.id, True], 'OK message must be ["OK", <event id>, <accepted>, <message>]'),
        (["OK", EV.id.upper(), True, ""], "OK event id must be 64 lowercase hex characters"),
        (["OK", EV.id, 1, ""], "OK accepted flag must be true or false"),
        (["OK", EV.id, "true", ""], "OK accepted flag must be true or false"),
        (["OK", EV.id, True, None], "OK message must be a string"),
        (["EOSE"], 'EOSE message must be ["EOSE", <subscription id>]'),
        (["EOSE", 1], "subscription id must be a non-empty string"),
        (["CLOSED", "s"], 'CLOSED message must be ["CLOSED", <subscription id>, <message>]'),
        (["CLOSED", "s", 1], "CLOSED message must be a string"),
        (["NOTICE"], 'NOTICE message must be ["NOTICE", <message>]'),
        (["NOTICE", {}], "NOTICE message must be a string"),
        (["COUNT", "s", 3], 'COUNT result must be {"count": <non-negative integer>}'),
        (["COUNT", "s", {"count": -1}], 'COUNT result must be {"count": <non-negative integer>}'),
        (["COUNT", "s", {"count": True}], 'COUNT result must be {"count": <non-negative integer>}'),
        (["COUNT", "s", {"count": 1.0}], 'COUNT result must be {"count": <non-negative integer>}'),
        (["COUNT", "s", {}], 'COUNT result must be {"count": <non-negative integer>}'),
        (["AUTH", 5], "AUTH challenge must be a string"),
        (["AUTH", "c", "d"], 'AUTH message must be ["AUTH", <challenge>]'),
        (["REQ", "s", {}], 'unknown message type "REQ"'),
        (["CLOSE", "s"], 'unknown message type "CLOSE"'),
    ],
)
def test_bad_relay_message(items: list[object], text: str) -> None:
    assert relay_error(frame(*items)).text == text


@pytest.mark.parametrize("text", ["", "[]", "[1]", "[NaN]", '"OK"', "{}"])
def test_relay_message_must_be_an_array_of_json(text: str) -> None:
    relay_error(text)
