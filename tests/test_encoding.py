import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.encoding import GSM7_EXTENSION, _cost, count_parts, encoding_of, fit, units


@pytest.mark.parametrize("n,parts", [(0, 1), (160, 1), (161, 2), (306, 2), (307, 3), (459, 3), (460, 4)])
def test_gsm7_parts(n, parts):
    assert count_parts("a" * n) == ("GSM-7", parts)


@pytest.mark.parametrize("n,parts", [(70, 1), (71, 2), (134, 2), (135, 3)])
def test_ucs2_parts(n, parts):
    assert count_parts("ж" * n) == ("UCS-2", parts)


def test_extension_characters_count_double():
    assert units("€[]", "GSM-7") == 6
    assert count_parts("a" * 158 + "€") == ("GSM-7", 1)  # 160 septets
    assert count_parts("a" * 159 + "€") == ("GSM-7", 2)  # 161


def test_escape_pair_never_split_across_parts():
    # 152 septets, then "€" (escape + char) cannot straddle the 153-septet boundary: it opens
    # part 2, so 306 septets (2 parts by division) need 3 parts when packed.
    tight = "a" * 152 + "€" + "a" * 152
    assert units(tight, "GSM-7") == 306
    assert count_parts(tight) == ("GSM-7", 3)
    assert count_parts("a" * 153 + "€" + "a" * 151) == ("GSM-7", 2)


def test_surrogate_pairs_count_two_and_never_split():
    assert units("😀", "UCS-2") == 2
    assert count_parts("😀" * 35) == ("UCS-2", 1)  # 70 units
    assert count_parts("😀" * 36) == ("UCS-2", 2)
    tight = "x" * 66 + "😀" + "x" * 66  # 134 units: 2 parts by division, 3 when packed
    assert count_parts(tight) == ("UCS-2", 3)


def test_encoding_detection_from_fixture_characters():
    assert encoding_of("ünïcödé") == "UCS-2"  # ï and ö... ö is GSM, ï is not
    assert encoding_of("Düsseldorf ü ö ä Ñ") == "GSM-7"
    assert encoding_of("db-1 / at 93% — x") == "UCS-2"  # em dash
    assert encoding_of("cost 5€ {x}") == "GSM-7"
    assert "€" in GSM7_EXTENSION


def test_fit_unchanged_when_it_fits():
    r = fit("hello", 1)
    assert (r.text, r.encoding, r.parts, r.truncated) == ("hello", "GSM-7", 1, False)


@pytest.mark.parametrize("max_parts", [1, 2, 3])
def test_fit_gsm_cut_uses_three_dots(max_parts):
    r = fit("word " * 200, max_parts)
    assert r.truncated and r.text.endswith("...") and r.encoding == "GSM-7"
    assert r.parts == max_parts
    assert units(r.text, "GSM-7") > (160 if max_parts == 1 else 153 * max_parts) - 10  # uses the room


@pytest.mark.parametrize("max_parts", [1, 2, 3])
def test_fit_ucs2_cut_uses_ellipsis_char(max_parts):
    r = fit("жжж " * 200, max_parts)
    assert r.truncated and r.text.endswith("…") and r.encoding == "UCS-2" and r.parts == max_parts


def test_fit_never_leaves_half_a_surrogate_pair():
    r = fit("😀" * 100, 1)
    assert r.text == "😀" * 34 + "…"
    r.text.encode("utf-16", "strict")  # a lone surrogate would raise


def test_cut_dropping_the_only_ucs2_character_becomes_gsm7():
    text = "a" * 300 + "—" + "b" * 10
    r = fit(text, 1)
    assert r.encoding == "GSM-7" and r.text == "a" * 157 + "..." and r.parts == 1


_alphabet = st.sampled_from(list("abc xyz€[]^|~{}") + ["—", "ж", "😀", "ü", "\n"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_alphabet, max_size=700).map("".join), st.integers(min_value=1, max_value=5))
def test_fit_property(text, max_parts):
    r = fit(text, max_parts)
    encoding, parts = count_parts(r.text)
    assert parts <= max_parts and (encoding, parts) == (r.encoding, r.parts)
    if not r.truncated:
        assert r.text == text
    else:
        ellipsis = "..." if r.encoding == "GSM-7" else "…"
        assert r.text.endswith(ellipsis)
        assert text.startswith(r.text[: -len(ellipsis)])
    r.text.encode("utf-16", "strict")


# The packing is done with prefix sums and bisection for speed; check it against the plain
# character-by-character definition on arbitrary texts (extension characters, emoji, both).
_ALPHABET = st.sampled_from(list("abc XYZ09.:[]{}~^€|\\\n") + ["é", "ñ", "Ж", "漢", "😀", "🚨"])


def _reference_parts(text: str) -> int:
    enc = encoding_of(text)
    total = sum(_cost(ch, enc) for ch in text)
    single, size = (160, 153) if enc == "GSM-7" else (70, 67)
    if total <= single:
        return 1
    parts, used = 1, 0
    for ch in text:
        cost = _cost(ch, enc)
        if used + cost > size:
            parts, used = parts + 1, 0
        used += cost
    return parts


@settings(max_examples=400, deadline=None)
@given(st.lists(_ALPHABET, max_size=700).map("".join), st.integers(1, 4))
def test_parts_and_cuts_match_the_plain_definition(text, max_parts):
    assert count_parts(text)[1] == _reference_parts(text)
    sms = fit(text, max_parts)
    assert sms.parts == _reference_parts(sms.text) <= max_parts
    if sms.truncated:
        body = sms.text.removesuffix("...").removesuffix("…")
        assert text.startswith(body)
        longer = text[: len(body) + 1] + ("..." if sms.encoding == "GSM-7" else "…")
        # one more character would not have fitted (unless the cut fell on trailing spaces)
        assert _reference_parts(longer) > max_parts or not text[len(body):].strip() or \
            text[len(body)] == " " or sms.encoding != encoding_of(text)
