import re

import pytest

from dimfix import corpus

VALIDATION = [
    "A cat sleeping in sunlight",
    "A mountain landscape at sunset",
    "A futuristic city with neon lights",
    "An old man reading a book",
    "A bowl of fresh fruit",
]


@pytest.fixture(scope="module")
def shipped():
    return corpus.load_default_corpus()


def test_default_path_is_inside_the_pack():
    path = corpus.default_corpus_path()
    assert path.name == "calibration_prompts.txt"
    assert path.parent.name == "fix_tables"
    assert path.is_file()


def test_shipped_corpus_is_large_unique_and_has_validation_prompts(shipped):
    assert len(shipped.prompts) >= 64
    assert len(set(shipped.prompts)) == len(shipped.prompts)
    assert shipped.notes == []  # no duplicates in the shipped file
    for p in VALIDATION:
        assert p in shipped.prompts
    assert all(p == p.strip() and p and not p.startswith("#") for p in shipped.prompts)


def test_shipped_corpus_length_spread(shipped):
    words = sorted(len(p.split()) for p in shipped.prompts)
    assert words[0] <= 3
    assert words[-1] >= 50
    buckets = [sum(lo <= w <= hi for w in words) for lo, hi in [(1, 5), (6, 12), (13, 25), (26, 1000)]]
    assert all(b >= 3 for b in buckets), buckets
    # not dominated by one length: the middle half spans several words
    q1, q3 = words[len(words) // 4], words[3 * len(words) // 4]
    assert q3 - q1 >= 4


def test_shipped_corpus_subject_variety(shipped):
    text = "\n".join(shipped.prompts).lower()
    groups = {
        "animals": ["cat", "owl", "zebra", "fish", "fox", "dragon", "puppy"],
        "people": ["woman", "man", "girl", "grandmother", "elder", "child", "nurse"],
        "landscape": ["mountain", "desert", "lake", "fjord", "forest", "river"],
        "styles": ["oil painting", "watercolor", "pixel art", "ukiyo-e", "charcoal"],
        "lighting": ["golden hour", "rim light", "backlit", "candle"],
        "technical": ["diagram", "blueprint", "cross-section", "circuit"],
        "food": ["pho", "injera", "churros", "dumplings"],
    }
    for name, keys in groups.items():
        hits = sum(k in text for k in keys)
        assert hits >= 2, f"{name}: {hits}"
    quoted = [p for p in shipped.prompts if re.search(r'"[^"]+"', p)]
    assert len(quoted) >= 3  # text rendering prompts
    assert any(not p.isascii() for p in shipped.prompts)  # non-English names


def test_parse_rules_comments_blank_strip_duplicates():
    text = "# header\n\n  a red apple  \n\t\n   # indented comment\nA dog\na red apple\nA dog\r\nlast"
    res = corpus.parse_corpus(text, source="x.txt")
    assert res.prompts == ["a red apple", "A dog", "last"]
    assert len(res) == 3
    assert len(res.notes) == 2
    assert "line 7" in res.notes[0] and "line 3" in res.notes[0]
    assert "line 8" in res.notes[1]


@pytest.mark.parametrize("bad", ["a cat<|endoftext|>", "<|im_start|>user a cat", "cat <think> x", "a <|vision_start|> b"])
def test_special_token_text_rejected(bad):
    with pytest.raises(ValueError, match=r"line 2.*special-token"):
        corpus.parse_corpus("ok prompt\n" + bad)


def test_angle_brackets_that_are_not_special_tokens_are_kept():
    res = corpus.parse_corpus("a sign reading <OPEN> | closed\nx < y > z")
    assert res.prompts == ["a sign reading <OPEN> | closed", "x < y > z"]


@pytest.mark.parametrize("text", ["", "\n\n  \n", "# only a comment\n#another"])
def test_empty_corpus_raises(text):
    with pytest.raises(ValueError, match="corpus is empty.*one image prompt per line"):
        corpus.parse_corpus(text)


def test_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        corpus.load_corpus(tmp_path / "nope.txt")


def test_load_corpus_utf8(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("pão de queijo\n", encoding="utf-8")
    assert corpus.load_corpus(p).prompts == ["pão de queijo"]
