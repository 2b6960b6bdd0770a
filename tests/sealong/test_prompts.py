"""The paper's prompt strategies, the authors' message layout, and one BOS after the chat template."""

import pytest
from tiny_checkpoint import build_tokenizer

from sealong.data.prompts import STRATEGIES, chat_prompt, prompt_token_ids, user_message

PLAN_AND_SOLVE = ("Let's first understand the problem and devise a plan to solve it. Then, let's carry out the plan "
                  "and solve the problem step-by-step.")


def test_strategies_verbatim():
    assert set(STRATEGIES) == {"default", "direct_answer", "step_by_step", "fact_and_reflection", "plan_and_solve"}
    assert STRATEGIES["plan_and_solve"] == PLAN_AND_SOLVE
    assert STRATEGIES["step_by_step"] == "Let's think step by step."
    assert STRATEGIES["direct_answer"] == "Let's answer the question directly."
    assert STRATEGIES["fact_and_reflection"] == (
        "Let's first identify the relevant information from the long context and list it. Then, carry out "
        "step-by-step reasoning based on that information, and finally, provide the answer."
    )


def test_message_layout():
    assert user_message("CTX", "Who?") == "\nCTX\n\nWho?\n" + PLAN_AND_SOLVE + "\n"
    assert user_message("CTX", "Who?", "default") == "\nCTX\n\nWho?\n"  # empty instruction: no blank tail line
    with pytest.raises(ValueError, match="unknown prompt strategy 'cot'"):
        user_message("CTX", "Who?", "cot")


def test_chat_template_and_one_bos():
    tok = build_tokenizer()
    text = chat_prompt(tok, "passage 1 : paris", "where is it ?", "step_by_step")
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n\npassage 1 : paris\n\n")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = prompt_token_ids(tok, "passage 1 : paris", "where is it ?", "step_by_step")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2  # the trap: special tokens added twice


def test_tokenizer_without_template_named():
    tok = build_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt(tok, "c", "q")
