"""Event ids, canonical text, signatures and every rejection rule of parse_event."""

from __future__ import annotations

import hashlib
import json
import pickle
from typing import Any

import coincurve
import pytest

from hypertuna.protocol.nostr import (
    MAX_TIMESTAMP,
    EventMessage,
    NostrError,
    Prefix,
    compute_event_id,
    parse_client_message,
    parse_event,
    public_key_hex,
    reason,
    serialize_event,
    sign_event,
)
from tests.protocol.nostr_keys import ALICE, ALICE_PK, T0, as_json, note, rehash


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------- ids and text


def test_id_of_plain_event_is_hash_of_compact_array() -> None:
    ev = note("hi", tags=[["t", "nostr"]])
    preimage = f'[0,"{ALICE_PK}",{T0},1,[["t","nostr"]],"hi"]'
    assert ev.id == sha256_hex(preimage)
    assert compute_event_id(ALICE_PK, T0, 1, [["t", "nostr"]], "hi") == ev.id


def test_id_escapes_exactly_what_json_escapes() -> None:
    content = 'a\nb"c\\d\te\rf\bg\fh\x01i\x1fj'
    ev = note(content)
    # Written by hand, not with json.dumps: the seven short escapes and \u00XX for the other
    # control characters, lowercase hex, as JSON.stringify does.
    escaped = 'a\\nb\\"c\\\\d\\te\\rf\\bg\\fh\\u0001i\\u001fj'
    assert ev.id == sha256_hex(f'[0,"{ALICE_PK}",{T0},1,[],"{escaped}"]')
    assert f'"content":"{escaped}"' in ev.raw
    assert parse_event(json.loads(ev.raw)) == ev


def test_non_ascii_and_emoji_are_raw_utf8_not_escaped() -> None:
    content = "héllo 日本 🤙\u2028\x7f/"
    ev = note(content, tags=[["t", "café"]])
    preimage = f'[0,"{ALICE_PK}",{T0},1,[["t","café"]],"{content}"]'
    assert ev.id == sha256_hex(preimage)
    assert f'"content":"{content}"' in ev.raw
    assert "\\u" not in ev.raw
    assert parse_event(json.loads(ev.raw)).content == content


def test_raw_has_nip01_key_order_and_no_spaces() -> None:
    ev = note("x", tags=[["e", "a" * 64, "wss://r.example"]])
    assert list(json.loads(ev.raw)) == [
        "id",
        "pubkey",
        "created_at",
        "kind",
        "tags",
        "content",
        "sig",
    ]
    expected = json.dumps(
        {
            "id": ev.id,
            "pubkey": ev.pubkey,
            "created_at": ev.created_at,
            "kind": ev.kind,
            "tags": [list(t) for t in ev.tags],
            "content": ev.content,
            "sig": ev.sig,
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )
    assert ev.raw == expected
    assert (
        serialize_event(ev.id, ev.pubkey, ev.created_at, ev.kind, ev.tags, ev.content, ev.sig)
        == expected
    )


def test_compute_event_id_refuses_lone_surrogates() -> None:
    with pytest.raises(NostrError) as info:
        compute_event_id(ALICE_PK, T0, 1, [], "bad \ud800")
    assert info.value.prefix is Prefix.INVALID
    assert "surrogate" in info.value.text
    with pytest.raises(NostrError):
        compute_event_id(ALICE_PK, T0, 1, [["t", "\udfff"]], "")


# Published kind-1 note quoted in the docstring of types/event.py of the public GitHub repository
# fulminologylabs/nostar-scrape (created_at 1684947090). The text below is as published, including
# its \u escapes for "ö" and the emoji surrogate pairs.
PUBLISHED = (
    '{"id": "cd720b23163210ebddec88bc4e74d83c9667cdf11b95d376865315c686ed34eb", '
    '"pubkey": "11d0b66747887ba9a6d34b23eb31287374b45b1a1b161eac54cb183c53e00ef7", '
    '"created_at": 1684947090, "kind": 1, "tags": [["e", '
    '"f9f30e37adffe3afe12fda2f8db4502ece334f261273a9a0be7e8adb29b35145"], ["p", '
    '"9eefd04d32ab5da8de12d7b83201578ea095a676acf3a692ec1b0b202ae4e16f"]], '
    '"content": "I\'ll take a large lill\\u00f6rdag please.\\n\\n'
    "\\ud83d\\ude0e\\ud83e\\udd19\\ud83d\\udc47\\ud83c\\udf7b\\n\\nnostr:nevent1qqs0nucwx7kllca0uyha"
    "5tudk3gzan3nfunpyuaf5zl8azkm9xe4z3gpzamhxue69uhhyetvv9ujumn0wd68ytnzv9hxgtczyz0wl5zdx244m2x7"
    'zttmsvsp2782p9dxw6k08f5jasdskgp2unsk7qcyqqqqqqgncdx20", '
    '"sig": "6c66e42dd481a0769148be33932a643672710f0ed83eeaaf4af5fe0f53e52b810a924ba2498354b8b0'
    '0a54f065f4de0d92c42c70fdb39a2da67ac97baf4f9ae0"}'
)


def test_published_event_verifies() -> None:
    ev = parse_event(json.loads(PUBLISHED))
    assert ev.id == "cd720b23163210ebddec88bc4e74d83c9667cdf11b95d376865315c686ed34eb"
    assert ev.created_at == 1684947090
    assert ev.tags[1] == ("p", "9eefd04d32ab5da8de12d7b83201578ea095a676acf3a692ec1b0b202ae4e16f")
    assert ev.content.startswith("I'll take a large lillördag please.\n\n😎🤙👇🍻\n\nnostr:")
    # The canonical text carries the characters themselves, not the \u escapes it came with.
    assert "lillördag" in ev.raw
    assert "😎🤙👇🍻" in ev.raw
    assert parse_event(json.loads(ev.raw)) == ev
    assert parse_client_message('["EVENT",' + PUBLISHED + "]") == EventMessage(ev)


# ------------------------------------------------------------------------------------ signing


def test_sign_event_makes_a_verifiable_bip340_signature() -> None:
    ev = note("signed")
    assert ev.pubkey == ALICE_PK == public_key_hex(ALICE)
    assert len(ev.sig) == 128
    key = coincurve.PublicKeyXOnly(bytes.fromhex(ev.pubkey))
    assert key.verify(bytes.fromhex(ev.sig), bytes.fromhex(ev.id))
    assert parse_event(as_json(ev)) == ev


def test_public_key_hex_matches_bip340_test_vector() -> None:
    # BIP-340 test vector 0: secret key 3 has x-only public key F9308A01...
    secret = (3).to_bytes(32, "big")
    assert public_key_hex(secret) == (
        "f9308a019258c31049344f85f89d5229b531c845836f99b08601f113bce036f9"
    )


def test_sign_event_accepts_boundaries() -> None:
    for created_at, kind in [(0, 0), (MAX_TIMESTAMP, 65535)]:
        ev = note(created_at=created_at, kind=kind)
        assert parse_event(as_json(ev)) == ev


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"created_at": -1}, "created_at"),
        ({"created_at": MAX_TIMESTAMP + 1}, "created_at"),
        ({"kind": 65536}, "kind"),
        ({"kind": True}, "kind"),
        ({"tags": ["e"]}, "tags"),
        ({"tags": "e"}, "tags"),
        ({"tags": [["e", 1]]}, "tags"),
        ({"content": "\ud800"}, "surrogate"),
    ],
)
def test_sign_event_refuses_what_parse_event_would(fields: dict[str, Any], text: str) -> None:
    args: dict[str, Any] = {"created_at": T0, "kind": 1, "tags": [], "content": ""}
    args.update(fields)
    with pytest.raises(NostrError) as info:
        sign_event(ALICE, **args)
    assert text in info.value.text


def test_sign_event_refuses_bad_secret_key() -> None:
    with pytest.raises(ValueError, match="Secret scalar"):
        sign_event(b"\x00" * 32, created_at=T0, kind=1)


def test_extra_keys_are_ignored_and_left_out_of_raw() -> None:
    ev = note()
    obj = as_json(ev)
    obj["relay"] = "wss://x"
    obj["seen_on"] = [1, 2]
    parsed = parse_event(obj)
    assert parsed == ev
    assert parsed.raw == ev.raw


# --------------------------------------------------------------------------------- rejections

GOOD = note("the quick brown fox", tags=[["e", "a" * 64], ["t", "fox"]])
MISSING = object()


def mutated(field: str, value: object) -> dict[str, Any]:
    obj = as_json(GOOD)
    if value is MISSING:
        del obj[field]
    else:
        obj[field] = value
    return obj


def reject(obj: object) -> NostrError:
    with pytest.raises(NostrError) as info:
        parse_event(obj)
    assert info.value.prefix is Prefix.INVALID
    return info.value


@pytest.mark.parametrize("obj", [None, [], "event", 1, [GOOD.raw]])
def test_non_object_is_rejected(obj: object) -> None:
    err = reject(obj)
    assert err.text == "event must be a JSON object"
    assert err.event_id is None


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (MISSING, "event id is missing"),
        (None, "event id must be 64 lowercase hex characters"),
        (1, "event id must be 64 lowercase hex characters"),
        (GOOD.id.upper(), "event id must be 64 lowercase hex characters"),
        (GOOD.id[:63], "event id must be 64 lowercase hex characters"),
        (GOOD.id + "0", "event id must be 64 lowercase hex characters"),
        ("g" + GOOD.id[1:], "event id must be 64 lowercase hex characters"),
        (GOOD.id + "\n", "event id must be 64 lowercase hex characters"),
        ([GOOD.id], "event id must be 64 lowercase hex characters"),
    ],
)
def test_bad_id_is_rejected_without_event_id(value: object, text: str) -> None:
    err = reject(mutated("id", value))
    assert err.text == text
    assert err.event_id is None


@pytest.mark.parametrize(
    ("field", "value", "text"),
    [
        ("pubkey", MISSING, "pubkey is missing"),
        ("pubkey", GOOD.pubkey.upper(), "pubkey must be 64 lowercase hex characters"),
        ("pubkey", GOOD.pubkey[:-2], "pubkey must be 64 lowercase hex characters"),
        ("pubkey", "npub1" + GOOD.pubkey[5:], "pubkey must be 64 lowercase hex characters"),
        ("pubkey", 5, "pubkey must be 64 lowercase hex characters"),
        ("created_at", MISSING, "created_at is missing"),
        ("created_at", "1700000000", "created_at must be an integer"),
        ("created_at", 1.5, "created_at must be an integer"),
        ("created_at", 1e9, "created_at must be an integer"),
        ("created_at", 1700000000.0, "created_at must be an integer"),
        ("created_at", True, "created_at must be an integer"),
        ("created_at", None, "created_at must be an integer"),
        ("created_at", -1, "created_at must not be negative"),
        ("created_at", 2**63, f"created_at must be at most {MAX_TIMESTAMP}"),
        ("created_at", 10**30, f"created_at must be at most {MAX_TIMESTAMP}"),
        ("kind", MISSING, "kind is missing"),
        ("kind", -1, "kind must be an integer from 0 to 65535"),
        ("kind", 65536, "kind must be an integer from 0 to 65535"),
        ("kind", True, "kind must be an integer from 0 to 65535"),
        ("kind", False, "kind must be an integer from 0 to 65535"),
        ("kind", 1.0, "kind must be an integer from 0 to 65535"),
        ("kind", "1", "kind must be an integer from 0 to 65535"),
        ("tags", MISSING, "tags is missing"),
        ("tags", None, "tags must be a list of lists of strings"),
        ("tags", {}, "tags must be a list of lists of strings"),
        ("tags", "e", "tags must be a list of lists of strings"),
        ("tags", ["e", "x"], "tags must be a list of lists of strings"),
        ("tags", [["e", 1]], "tags must be a list of lists of strings"),
        ("tags", [["e", None]], "tags must be a list of lists of strings"),
        ("tags", [["e", ["x"]]], "tags must be a list of lists of strings"),
        ("tags", [["t", "ok"], {"e": "x"}], "tags must be a list of lists of strings"),
        ("content", MISSING, "content is missing"),
        ("content", None, "content must be a string"),
        ("content", 1, "content must be a string"),
        ("content", ["x"], "content must be a string"),
        ("sig", MISSING, "sig is missing"),
        ("sig", GOOD.sig.upper(), "sig must be 128 lowercase hex characters"),
        ("sig", GOOD.sig[:-1], "sig must be 128 lowercase hex characters"),
        ("sig", GOOD.sig + "00", "sig must be 128 lowercase hex characters"),
        ("sig", 0, "sig must be 128 lowercase hex characters"),
    ],
)
def test_bad_field_is_rejected_with_event_id(field: str, value: object, text: str) -> None:
    err = reject(mutated(field, value))
    assert err.text == text
    assert err.event_id == GOOD.id
    assert str(err) == f"invalid: {text}"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("content", "the quick brown fox!"),
        ("tags", [["e", "a" * 64], ["t", "cat"]]),
        ("tags", [["e", "a" * 64]]),
        ("tags", [["t", "fox"], ["e", "a" * 64]]),
        ("kind", 2),
        ("created_at", T0 + 1),
        ("pubkey", public_key_hex(bytes.fromhex("02" * 32))),
    ],
)
def test_tampering_breaks_the_id(field: str, value: object) -> None:
    err = reject(mutated(field, value))
    assert str(err) == "invalid: event id does not match its content"
    assert err.event_id == GOOD.id


def test_tampered_signature_is_a_bad_signature() -> None:
    flipped = ("1" if GOOD.sig[10] != "1" else "2").join((GOOD.sig[:10], GOOD.sig[11:]))
    err = reject(mutated("sig", flipped))
    assert str(err) == "invalid: bad signature"
    assert err.event_id == GOOD.id


def test_rehashed_tampered_content_is_a_bad_signature() -> None:
    obj = rehash(mutated("content", "something else"))
    err = reject(obj)
    assert str(err) == "invalid: bad signature"
    assert err.event_id == obj["id"]


def test_signature_of_another_key_is_a_bad_signature() -> None:
    other = sign_event(bytes.fromhex("02" * 32), created_at=T0, kind=1, content=GOOD.content)
    obj = rehash(mutated("pubkey", other.pubkey))
    assert reject(obj).text == "bad signature"


@pytest.mark.parametrize(
    "pubkey",
    [
        "00" * 31 + "05",  # 5**3 + 7 is not a square modulo p: no point has this x
        "00" * 32,
        "ff" * 32,  # larger than the field prime
        f"{2**256 - 2**32 - 977:064x}",  # exactly the field prime
    ],
)
def test_pubkey_that_is_not_a_curve_point_is_a_bad_signature(pubkey: str) -> None:
    with pytest.raises(ValueError, match="could not be parsed or is invalid"):
        coincurve.PublicKeyXOnly(bytes.fromhex(pubkey))
    obj = rehash(mutated("pubkey", pubkey))
    err = reject(obj)
    assert err.text == "bad signature"
    assert err.event_id == obj["id"]


def test_lone_surrogate_in_signed_fields_is_invalid_not_a_crash() -> None:
    # json.loads turns the escape into a lone surrogate, which has no UTF-8 form to hash.
    for field, value in [("content", "x\ud800"), ("tags", [["t", "\udc00"]])]:
        obj = mutated(field, value)
        err = reject(obj)
        assert "surrogate" in err.text
        assert err.event_id == GOOD.id


# ------------------------------------------------------------------------------------- errors


def test_prefixes_and_reason() -> None:
    assert [p.value for p in Prefix] == [
        "invalid",
        "duplicate",
        "blocked",
        "rate-limited",
        "restricted",
        "error",
        "auth-required",
    ]
    assert reason(Prefix.RATE_LIMITED, "slow down") == "rate-limited: slow down"
    assert reason(Prefix.AUTH_REQUIRED, "who are you") == "auth-required: who are you"


def test_nostr_error_attributes_and_pickling() -> None:
    err = NostrError(Prefix.BLOCKED, "no lease", event_id="a" * 64)
    assert str(err) == "blocked: no lease"
    assert (err.prefix, err.text, err.event_id, err.sub_id) == (
        Prefix.BLOCKED,
        "no lease",
        "a" * 64,
        None,
    )
    copy = pickle.loads(pickle.dumps(NostrError(Prefix.INVALID, "x", sub_id="s")))
    assert isinstance(copy, NostrError)
    assert (copy.prefix, copy.text, copy.event_id, copy.sub_id) == (
        Prefix.INVALID,
        "x",
        None,
        "s",
    )
    assert "sub_id='s'" in repr(copy)


@pytest.mark.parametrize("value", ["\u00b2", "\uff11\uff12", "12a", "", "-5", "1" * 19])
def test_expiration_that_is_not_a_plain_integer_is_ignored(value: str) -> None:
    from hypertuna.protocol.nostr import sign_event

    event = sign_event(b"\x01" * 32, created_at=1, kind=1, tags=[["expiration", value]])
    assert event.expiration is None
