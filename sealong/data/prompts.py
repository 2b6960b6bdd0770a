"""The paper's prompting strategies (SEALONG, arXiv 2411.08147, Tables 9 and 10) and the chat-template wrapping.

The user message is laid out as the authors' code does it, for sampling and evaluation alike:

    "\\n" + context + "\\n\\n" + (question + "\\n" + instruction).strip() + "\\n"

so the default strategy (empty instruction) ends with the question line. The message is wrapped by the
tokenizer's own chat template (with the generation prompt) and the template's text is tokenized WITHOUT
adding special tokens again: one BOS, not the two that re-tokenizing with special tokens gives Llama.
"""

STRATEGIES = {
    "default": "",
    "direct_answer": "Let's answer the question directly.",
    "step_by_step": "Let's think step by step.",
    "fact_and_reflection": (
        "Let's first identify the relevant information from the long context and list it. Then, carry out "
        "step-by-step reasoning based on that information, and finally, provide the answer."
    ),
    "plan_and_solve": (
        "Let's first understand the problem and devise a plan to solve it. Then, let's carry out the plan and "
        "solve the problem step-by-step."
    ),
}
DEFAULT_STRATEGY = "plan_and_solve"


def user_message(context: str, question: str, strategy: str = DEFAULT_STRATEGY) -> str:
    """The single user message: context, a blank line, the question, then the strategy's instruction."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown prompt strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return "\n" + context + "\n\n" + f"{question}\n{STRATEGIES[strategy]}".strip() + "\n"


def chat_text(tokenizer, message: str) -> str:
    """A user message wrapped by the tokenizer's chat template, ending with the assistant's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template; the prompts need one")
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                         tokenize=False)


def chat_token_ids(tokenizer, message: str) -> list[int]:
    """Token ids of the templated message; the template already holds BOS, so no special tokens are added.
    Sampling, training and evaluation all encode prompts through this one function."""
    return tokenizer(chat_text(tokenizer, message), add_special_tokens=False)["input_ids"]


def chat_prompt(tokenizer, context: str, question: str, strategy: str = DEFAULT_STRATEGY) -> str:
    """The paper's prompt for (context, question, strategy) as chat-templated text."""
    return chat_text(tokenizer, user_message(context, question, strategy))


def prompt_token_ids(tokenizer, context: str, question: str, strategy: str = DEFAULT_STRATEGY) -> list[int]:
    """Token ids of the paper's prompt for (context, question, strategy): see chat_token_ids."""
    return chat_token_ids(tokenizer, user_message(context, question, strategy))


def record_token_ids(tokenizer, record: dict, strategy: str = DEFAULT_STRATEGY) -> list[int]:
    """Token ids of a prompts-file record: its `prompt` (a whole user message, e.g. a benchmark's own template:
    RULER, LongBench v2) when it has one, else the paper's prompt of its context and question."""
    if isinstance(record.get("prompt"), str):
        return chat_token_ids(tokenizer, record["prompt"])
    return prompt_token_ids(tokenizer, record["context"], record["question"], strategy)
