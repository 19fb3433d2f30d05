"""`Signer`: an output URL is "ok" until its expiry, "expired" after, and "bad" when any part of it
was not made with this store's secret (tampered path, expiry or signature, or another secret)."""

from __future__ import annotations

import time
from urllib.parse import parse_qs

import pytest

from kolors_api.api.signing import Signer

PATH = "/v2/requests/0123456789abcdef0123456789abcdef/outputs/0.webp"
SECRET = b"s" * 32


def signed(signer: Signer, path: str, expires: float) -> tuple[str, str]:
    """The (exp, sig) that `Signer.query` puts in a URL, read back the way a server would."""
    query = parse_qs(signer.query(path, expires), strict_parsing=True)
    return query["exp"][0], query["sig"][0]


@pytest.fixture
def signer() -> Signer:
    return Signer(SECRET)


def test_a_fresh_url_is_ok(signer: Signer) -> None:
    exp, sig = signed(signer, PATH, time.time() + 60)

    assert signer.check(PATH, exp, sig) == "ok"


def test_the_query_carries_the_whole_second_expiry_and_its_signature(signer: Signer) -> None:
    exp, sig = signed(signer, PATH, 1_900_000_000.9)

    assert exp == "1900000000"
    assert sig == signer.sign(PATH, 1_900_000_000)
    assert len(sig) == 64 and int(sig, 16) >= 0  # hex SHA-256


def test_an_authentic_url_past_its_expiry_is_expired(signer: Signer) -> None:
    exp, sig = signed(signer, PATH, time.time() - 1)

    assert signer.check(PATH, exp, sig) == "expired"


def test_a_signature_from_another_secret_is_bad(signer: Signer) -> None:
    exp, sig = signed(Signer(b"t" * 32), PATH, time.time() + 60)

    assert signer.check(PATH, exp, sig) == "bad"


def test_an_expired_signature_from_another_secret_is_bad_not_expired(signer: Signer) -> None:
    exp, sig = signed(Signer(b"t" * 32), PATH, time.time() - 60)

    assert signer.check(PATH, exp, sig) == "bad"


def test_another_path_with_the_same_signature_is_bad(signer: Signer) -> None:
    exp, sig = signed(signer, PATH, time.time() + 60)

    assert signer.check(PATH.replace("0.webp", "1.webp"), exp, sig) == "bad"
    assert signer.check(PATH.replace("0123", "0124", 1), exp, sig) == "bad"


def test_a_pushed_back_expiry_is_bad(signer: Signer) -> None:
    exp, sig = signed(signer, PATH, time.time() - 1)

    assert signer.check(PATH, str(int(exp) + 3600), sig) == "bad"
    assert signer.check(PATH, str(int(exp) - 1), sig) == "bad"


def test_a_tampered_signature_is_bad(signer: Signer) -> None:
    exp, sig = signed(signer, PATH, time.time() + 60)
    flipped = ("0" if sig[-1] != "0" else "1")

    assert signer.check(PATH, exp, sig[:-1] + flipped) == "bad"
    assert signer.check(PATH, exp, sig[:-1]) == "bad"
    assert signer.check(PATH, exp, sig.upper()) == "bad"


@pytest.mark.parametrize("exp", ["", "-1", "+9999999999", "1e12", " 1900000000", "1900000000.0", "abc", "0x7f"])
def test_an_expiry_that_is_not_plain_digits_is_bad(signer: Signer, exp: str) -> None:
    # whatever it says, a non-digit expiry never reaches int(): no ValueError, no 500
    assert signer.check(PATH, exp, signer.sign(PATH, 1_900_000_000)) == "bad"


@pytest.mark.parametrize(("exp", "sig"), [(None, "x"), ("1900000000", None), (None, None), ("1900000000", "")])
def test_a_missing_part_is_bad(signer: Signer, exp: str | None, sig: str | None) -> None:
    assert signer.check(PATH, exp, sig) == "bad"


# str.isdigit() is True for more than int() parses: superscripts ("²") are digits to isdigit but
# not to int(), and Python refuses to parse more than 4300 digits. Such an expiry is simply bad.
@pytest.mark.parametrize("exp", ["²", "1900000000²", "9" * 5000, "١٩٠٠٠٠٠٠٠٠", "+1900000000", " 1900000000"])
def test_an_expiry_isdigit_accepts_but_int_refuses_is_bad_not_an_error(signer: Signer, exp: str) -> None:
    assert signer.check(PATH, exp, "0" * 64) == "bad"
