"""The WebUI's prompt syntax: its own doctests first, then cases checked against the WebUI's code.

Expected values were produced by running the WebUI's ``modules/prompt_parser.py`` (with lark).
"""

from __future__ import annotations

import pytest

from shared.webui.prompts import extract_lora_tags, parse_prompt_attention, prompt_schedules, split_and_prompts

# --------------------------------------------------------------------------------------------------
# parse_prompt_attention
# --------------------------------------------------------------------------------------------------

WEBUI_ATTENTION_DOCTESTS = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ["a ", 1.0],
            ["house", 1.5730000000000004],
            [" ", 1.1],
            ["on", 1.0],
            [" a ", 1.1],
            ["hill", 0.55],
            [", sun, ", 1.1],
            ["sky", 1.4641000000000006],
            [".", 1.1],
        ],
    ),
]

MORE_ATTENTION = [
    ("((a))", [["a", 1.2100000000000002]]),
    ("(((a)))", [["a", 1.3310000000000004]]),
    ("[a]", [["a", 0.9090909090909091]]),
    ("[[a]]", [["a", 0.8264462809917354]]),
    ("(a:1.5)", [["a", 1.5]]),
    ("(a: 1.5 )", [["a", 1.5]]),
    ("(a:.5)", [["a", 0.5]]),
    ("(a:0)", [["a", 0.0]]),
    ("(a:-1)", [["a", -1.0]]),
    ("a (b:1.2) c (d:1.2)", [["a ", 1.0], ["b", 1.2], [" c ", 1.0], ["d", 1.2]]),
    ("(a)[b]", [["a", 1.1], ["b", 0.9090909090909091]]),
    ("((a)", [["a", 1.2100000000000002]]),
    ("[unbalanced", [["unbalanced", 0.9090909090909091]]),
    ("(a[b", [["a", 1.1], ["b", 1.0]]),
    ("[a(b", [["a", 0.9090909090909091], ["b", 1.0]]),
    ("a]b)", [["a]b)", 1.0]]),
    (")a", [[")a", 1.0]]),
    ("a:b", [["a:b", 1.0]]),
    ("(a:b)", [["a:b", 1.1]]),
    ("[a:1.5]", [["a:1.5", 0.9090909090909091]]),
    ("\\\\", [["\\", 1.0]]),
    ("\\(a\\)", [["(a)", 1.0]]),
    ("a\\\\(b)", [["a\\", 1.0], ["b", 1.1]]),
    ("a\\b", [["ab", 1.0]]),  # a lone backslash disappears
    ("", [["", 1.0]]),
    ("()", [["", 1.0]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("a\nBREAK\nb", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("BREAK", [["", 1.0], ["BREAK", -1], ["", 1.0]]),
    ("BREAKfast BREAK", [["BREAKfast", 1.0], ["BREAK", -1], ["", 1.0]]),
    ("(a BREAK b)", [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]),  # the WebUI weights a BREAK too
]


@pytest.mark.parametrize(("text", "expected"), WEBUI_ATTENTION_DOCTESTS + MORE_ATTENTION)
def test_parse_prompt_attention_matches_the_webui(text: str, expected: list) -> None:
    assert parse_prompt_attention(text) == expected


def test_attention_weights_are_the_webuis_floats_not_rounded() -> None:
    assert parse_prompt_attention("((x))")[0][1] == 1.1 * 1.1
    assert parse_prompt_attention("[x]")[0][1] == 1 / 1.1


def test_portrait_preset_weights() -> None:
    preset = "(portrait:1.3),(best quality),(masterpiece),illustration,((bad hands)),[blurry]"
    assert parse_prompt_attention(preset) == [
        ["portrait", 1.3],
        [",", 1.0],
        ["best quality", 1.1],
        [",", 1.0],
        ["masterpiece", 1.1],
        [",illustration,", 1.0],
        ["bad hands", 1.2100000000000002],
        [",", 1.0],
        ["blurry", 0.9090909090909091],
    ]


def test_novelai_braces_are_plain_text() -> None:
    assert parse_prompt_attention("{{masterpiece}}, {best quality}") == [
        ["{{masterpiece}}, {best quality}", 1.0]
    ]


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)"])
def test_a_weight_that_is_no_number_is_an_error_as_in_the_webui(text: str) -> None:
    with pytest.raises(ValueError, match="not a number"):
        parse_prompt_attention(text)


# --------------------------------------------------------------------------------------------------
# prompt_schedules
# --------------------------------------------------------------------------------------------------

ALTERNATE_10 = [
    [1, "a"],
    [2, "(b:1.1)"],
    [3, "a"],
    [4, "(b:1.1)"],
    [5, "a"],
    [6, "(b:1.1)"],
    [7, "a"],
    [8, "(b:1.1)"],
    [9, "a"],
    [10, "(b:1.1)"],
]

WEBUI_SCHEDULE_DOCTESTS = [  # get_learned_conditioning_prompt_schedules([p], 10)[0]
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", ALTERNATE_10),
    ("[fe|]male", [[s, "female" if s % 2 else "male"] for s in range(1, 11)]),
    ("[fe|||]male", [[s, "female" if s % 4 == 1 else "male"] for s in range(1, 11)]),
]


@pytest.mark.parametrize(("prompt", "expected"), WEBUI_SCHEDULE_DOCTESTS)
def test_prompt_schedules_match_the_webui_doctests(prompt: str, expected: list) -> None:
    assert prompt_schedules(prompt, 10) == expected


def test_stale_webui_doctest_braces_with_a_pipe_are_plain_text() -> None:
    # The WebUI's doctest says [[5, 'a  c'], [10, 'a {b|d{ c']], but since "|" became the alternation
    # separator its grammar cannot parse this prompt, and the WebUI really returns it unchanged.
    assert prompt_schedules("a [{b|d{:.5] c", 10) == [[10, "a [{b|d{:.5] c"]]


def test_the_example_from_the_webuis_source_comment() -> None:
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
    )
    assert prompt_schedules(prompt, 100) == [
        [25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
        [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
        [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
        [75, "fantasy landscape with a lake and an oak in background masterful"],
        [100, "fantasy landscape with a lake and a christmas tree in background masterful"],
    ]


MORE_SCHEDULES = [
    # when: with a "." it is a fraction of the steps (even above 1), without one a step number
    ("[a:b:1.5]", 10, [[10, "a"]]),
    ("[a:b:1.0]", 10, [[10, "a"]]),
    ("[a:b:1]", 10, [[1, "a"], [10, "b"]]),
    ("[a:b:0.05]", 10, [[10, "b"]]),
    ("[a:b:2.]", 10, [[10, "a"]]),
    ("[a:b:1e1]", 10, [[10, "a"]]),
    ("[a:b:11]", 10, [[10, "a"]]),
    ("[a:b:-1]", 10, [[10, "b"]]),
    ("[a:b:+3]", 10, [[3, "a"], [10, "b"]]),
    ("[a:b:0.5]", 3, [[1, "a"], [3, "b"]]),
    ("[a:b: 4 ]", 10, [[4, "a"], [10, "b"]]),
    ("[a::3]", 10, [[3, "a"], [10, ""]]),
    ("[:3]", 10, [[3, ""], [10, ""]]),
    ("[a:b:c:3]", 10, [[10, "[a:b:c:3]"]]),
    ("[a:b:0.5:3]", 10, [[10, "[a:b:0.5:3]"]]),
    ("(a:[b:c:2])", 10, [[2, "(a:b)"], [10, "(a:c)"]]),
    ("[a [b:2]", 10, [[2, "[a "], [10, "[a b"]]),
    ("[[a:2]:3]", 10, [[2, ""], [3, ""], [10, "a"]]),
    ("[a|b|c]", 4, [[1, "a"], [2, "b"], [3, "c"], [4, "a"]]),
    ("[a|[b:c:2]]", 4, [[1, "a"], [2, "b"], [3, "a"], [4, "c"]]),
    ("[cat:dog:3] [red|blue]", 3, [[1, "cat red"], [2, "cat blue"], [3, "cat red"]]),
    ("\\[a:3\\]", 10, [[10, "\\[a:3\\]"]]),
    ("{extremely detailed}, {{best quality}}", 20, [[20, "{extremely detailed}, {{best quality}}"]]),
    ("[a:b:3]", 1, [[1, "a"]]),
    ("a\n[b:2]", 10, [[2, "a\n"], [10, "a\nb"]]),
]


@pytest.mark.parametrize(("prompt", "steps", "expected"), MORE_SCHEDULES)
def test_prompt_schedules_match_the_webui(prompt: str, steps: int, expected: list) -> None:
    assert prompt_schedules(prompt, steps) == expected


@pytest.mark.parametrize(
    "prompt",
    [
        "a | b [c:3]",  # "|" outside an alternation
        "[a|b:3]",
        "a [b:3] c\\",  # a trailing backslash escapes nothing
        "a\\\n[b:3]",  # a backslash cannot escape a newline
        "[a|b",
    ],
)
def test_unparsable_prompts_are_plain_text_for_every_step(prompt: str) -> None:
    assert prompt_schedules(prompt, 10) == [[10, prompt]]


def test_a_construct_followed_by_a_stray_bracket_is_scheduled() -> None:
    # The WebUI's Earley parser resolves this ambiguity differently from one process to the next
    # (it depends on PYTHONHASHSEED); we always take the construct, as for the well-formed prompt.
    assert prompt_schedules("[a:3]]", 10) == [[3, "]"], [10, "a]"]]


def test_a_huge_number_does_not_raise() -> None:
    assert prompt_schedules("[a:b:1e999]", 10) == [[10, "a"]]
    assert prompt_schedules("[a:b:-1e999]", 10) == [[10, "b"]]


def test_deep_nesting_does_not_raise() -> None:
    deep = "(" * 5000 + "a" + ")" * 5000
    assert prompt_schedules(deep, 10) == [[10, deep]]


def test_schedules_inside_thousands_of_brackets_are_found() -> None:
    # The WebUI's lark transformer hits Python's recursion limit on these; we do not.
    assert prompt_schedules("(" * 3000 + "[a:3]" + ")" * 3000, 10) == [
        [3, "(" * 3000 + ")" * 3000],
        [10, "(" * 3000 + "a" + ")" * 3000],
    ]
    assert prompt_schedules("[" * 3000 + " [a:3]", 10) == [[3, "[" * 3000 + " "], [10, "[" * 3000 + " a"]]


def test_long_prompt_is_parsed_quickly() -> None:
    prompt = ", ".join(f"[word{i}:other{i}:{i % 9 + 1}]" for i in range(500)) + " [" * 200
    schedule = prompt_schedules(prompt, 10)
    assert [step for step, _ in schedule] == list(range(1, 11))


# --------------------------------------------------------------------------------------------------
# split_and_prompts
# --------------------------------------------------------------------------------------------------

AND_CASES = [
    ("a cat", [("a cat", 1.0)]),
    ("a cat AND a dog:0.5", [("a cat", 1.0), (" a dog", 0.5)]),
    ("a AND b AND c", [("a", 1.0), (" b", 1.0), (" c", 1.0)]),
    ("ANDROID", [("ANDROID", 1.0)]),
    ("cat:1.2", [("cat", 1.2)]),  # a trailing weight counts even without AND
    ("(cat:1.2)", [("(cat:1.2)", 1.0)]),
    ("a :  2  ", [("a", 2.0)]),
    ("a:1.", [("a", 1.0)]),
    ("a:.5", [("a", 0.5)]),
    ("a:-1", [("a", -1.0)]),
    ("a:+2 AND b", [("a", 2.0), (" b", 1.0)]),
    ("a:1.2.3", [("a:1.2.3", 1.0)]),
    ("", [("", 1.0)]),
    ("a AND", [("a", 1.0), ("", 1.0)]),
    ("line one\nline two AND x:3", [("line one\nline two", 1.0), (" x", 3.0)]),
    ("a  AND  b", [("a", 1.0), ("  b", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), AND_CASES)
def test_split_and_prompts_matches_the_webui(prompt: str, expected: list) -> None:
    assert split_and_prompts(prompt) == expected


# --------------------------------------------------------------------------------------------------
# extract_lora_tags
# --------------------------------------------------------------------------------------------------

LORA_CASES = [
    ("1girl <lora:add_detail:0.5>, smile", "1girl , smile", [("add_detail", 0.5)]),
    ("<lora:foo>", "", [("foo", 1.0)]),
    ("<lora:foo:0.5:0.7>", "", [("foo", 0.5)]),
    ("<lora:foo:te=0.3>", "", [("foo", 0.3)]),
    ("<lora:foo:0.9:te=0.3>", "", [("foo", 0.3)]),
    ("<lora:foo:unet=0.2>", "", [("foo", 1.0)]),
    ("<lyco:bar:0.6>", "", [("bar", 0.6)]),
    ("<lora:my lora v1.5: 0.7 >", "", [("my lora v1.5", 0.7)]),
    ("a <lora:x:1> b <lora:y:-0.5> c", "a  b  c", [("x", 1.0), ("y", -0.5)]),
    ("a <hypernet:anime:1> b", "a  b", []),
    ("<lora:>", "<lora:>", []),
    ("no tags (at:1.2) [all]", "no tags (at:1.2) [all]", []),
    ("<lora:a:1>\n<lora:b:2>", "\n", [("a", 1.0), ("b", 2.0)]),
]


@pytest.mark.parametrize(("prompt", "cleaned", "loras"), LORA_CASES)
def test_extract_lora_tags_like_the_webui(prompt: str, cleaned: str, loras: list) -> None:
    assert extract_lora_tags(prompt) == (cleaned, loras)


@pytest.mark.parametrize("prompt", ["<lora:foo:strong>", "<lora:foo:te=x>", "<lora:te=1>"])
def test_a_lora_tag_without_a_usable_weight_or_name_is_an_error(prompt: str) -> None:
    with pytest.raises(ValueError, match="lora"):
        extract_lora_tags(prompt)
