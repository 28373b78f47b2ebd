import torch

from dimfix import tokens
from dimfix.tokens import TokenClass


def test_classify_ids_templated_prompt():
    # "a cat" in the Z-Image template, ids as produced by the Qwen3 tokenizer
    ids = [151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198]
    labels = tokens.classify_ids(ids)
    assert labels.tolist() == [0, 1, 1, 2, 2, 1, 1, 1, 1, 1]


def test_classify_ids_empty_prompt_and_appended_eos():
    ids = list(tokens.TEMPLATE_PREFIX_IDS) + list(tokens.TEMPLATE_SUFFIX_IDS) + [tokens.ENDOFTEXT]
    labels = tokens.classify_ids(ids)
    assert labels[0] == TokenClass.SINK
    assert labels[-1] == TokenClass.APPENDED_EOS
    assert (labels[1:-1] == TokenClass.TEMPLATE).all()


def test_classify_positions_matches_ids_for_template():
    ids = [151644, 872, 198, 64, 8251, 300, 151645, 198, 151644, 77091, 198]
    assert torch.equal(tokens.classify_positions(len(ids)), tokens.classify_ids(ids))


def test_scope_mask():
    labels = torch.tensor([0, 1, 2, 2, 1, 3])
    assert tokens.scope_mask(labels, "all").all()
    assert tokens.scope_mask(labels, "content").tolist() == [False, False, True, True, False, False]
    assert tokens.scope_mask(labels, "no_sink").tolist() == [False, True, True, True, True, False]
    try:
        tokens.scope_mask(labels, "bogus")
    except ValueError as e:
        assert "bogus" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_classify_ids_vl_think_block_is_template():
    # ComfyUI's Qwen3-VL tokenizer: the Z-Image template plus an empty think block "<think>\n\n</think>\n\n"
    ids = [151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]
    assert tokens.classify_ids(ids).tolist() == [0, 1, 1, 2, 2] + [1] * 9
    # "\n\n" (271) inside a prompt stays content
    assert tokens.classify_ids([151644, 872, 198, 271, 151645, 198, 151644, 77091, 198]).tolist()[3] == 2
