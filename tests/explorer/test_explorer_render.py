"""Text is escaped, and the words a passage shares with the test are marked."""

from __future__ import annotations

from explorer.render import content_words, highlighted


def test_content_words_drop_stop_words_and_case():
    assert content_words("The Bank of England AND the bank") == {"bank", "england"}
    assert content_words(None) == frozenset()


def test_highlight_marks_shared_words_and_escapes_everything():
    out = highlighted("Bank & <script>rates</script> the **bank**", frozenset({"bank", "rates"}))
    assert out == (
        '<mark class="msif-shared">Bank</mark> &amp; &lt;script&gt;'
        '<mark class="msif-shared">rates</mark>&lt;/script&gt; the '
        '**<mark class="msif-shared">bank</mark>**'
    )


def test_highlight_without_words_is_plain_escaped_text():
    assert highlighted("<i>x</i>", frozenset()) == "&lt;i&gt;x&lt;/i&gt;"
