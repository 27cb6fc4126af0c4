"""From a request to what the worker decodes: prompt token ids and a ``Sampling``, with the checks
that refuse a request before it is queued (empty or over-long prompts, unknown token ids,
``max_tokens`` above the server's limit).

Chat messages go through the tokenizer's chat template exactly as ``PromptFormatter`` formats an
evaluation prompt (same call, same generation prompt, the template's default system turn when the
request has none), so a one-message chat request sees the tokens ``forgetless eval`` feeds the
model. Raw completion prompts are tokenised as ``PromptFormatter``'s plain style does (special
tokens such as BOS where the tokenizer adds them); token-id prompts are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from forgetless.data.formatting import PromptFormatter
from forgetless.serving.decoding import Sampling
from forgetless.serving.protocol import ApiError, ChatRequest, CompletionRequest


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server.

    Attributes:
        max_tokens: ``max_tokens`` above this is refused (``--max-tokens-limit``); also the default
            budget of a chat reply.
        context: the model's context length (prompt + reply); None when its config does not say.
        vocabulary: token ids must be below this (the model's embedding rows).
    """

    max_tokens: int
    context: int | None
    vocabulary: int


def chat_prompt_ids(formatter: PromptFormatter, request: ChatRequest) -> list[int]:
    """Token ids of the messages with the assistant's turn opened."""
    turns = request.turns()
    if formatter.style != "chat":
        if len(turns) == 1 and turns[0]["role"] == "user":
            return formatter.prompt_ids(turns[0]["content"])
        raise ApiError(
            "messages: this model's tokenizer has no chat template, so only one user message can be "
            "formatted (as evaluation formats a prompt); send one user message or use /v1/completions",
            param="messages",
        )
    try:
        ids = formatter.tokenizer.apply_chat_template(
            turns, tokenize=True, add_generation_prompt=True, return_dict=False
        )
    except Exception as error:  # the template's own check (e.g. roles must alternate)  # noqa: BLE001
        raise ApiError(f"messages: the chat template refused them: {error}", param="messages") from None
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def completion_prompt_ids(formatter: PromptFormatter, request: CompletionRequest) -> list[list[int]]:
    """Token ids of each prompt of a completion request (text, token ids, or a list of either)."""
    prompt = request.prompt
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(item, int) for item in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise ApiError(
            "prompt: no prompt given; send a string, a list of strings or token ids", param="prompt"
        )
    tokenizer = formatter.tokenizer
    return [
        tokenizer(item, add_special_tokens=True).input_ids if isinstance(item, str) else list(item)
        for item in prompts
    ]


def check_prompts(prompts: list[list[int]], max_tokens: int, limits: Limits, field: str) -> None:
    """Refuse empty prompts, unknown token ids, and prompts that leave no room for ``max_tokens``."""
    for index, ids in enumerate(prompts):
        where = field if len(prompts) == 1 else f"{field}[{index}]"
        if not ids:
            raise ApiError(f"{where}: the prompt has no tokens; send some text", param=field)
        wrong = next((token for token in ids if not 0 <= token < limits.vocabulary), None)
        if wrong is not None:
            raise ApiError(
                f"{where}: token id {wrong} is outside the model's vocabulary (0 to {limits.vocabulary - 1})",
                param=field,
            )
        if limits.context is not None and len(ids) + max_tokens > limits.context:
            raise ApiError(
                f"{where}: the prompt has {len(ids)} tokens and max_tokens is {max_tokens}, but the "
                f"model's context is {limits.context} tokens; shorten the prompt or lower max_tokens",
                param=field,
            )


def sampling_for(
    request: ChatRequest | CompletionRequest, prompts: list[list[int]], limits: Limits
) -> Sampling:
    """The request's decoding settings, after checking its prompts and ``max_tokens``."""
    field = "messages" if isinstance(request, ChatRequest) else "prompt"
    asked = request.max_completion_tokens if isinstance(request, ChatRequest) else None
    asked = asked if asked is not None else request.max_tokens
    if asked is not None and asked > limits.max_tokens:
        raise ApiError(
            f"max_tokens: {asked} is above this server's limit of {limits.max_tokens} "
            "(forgetless serve --max-tokens-limit); ask for fewer tokens",
            param="max_tokens",
        )
    if asked is None:  # a chat reply without a budget: the limit, as far as the context allows
        room = limits.max_tokens if limits.context is None else limits.context - max(map(len, prompts))
        asked = max(1, min(limits.max_tokens, room))
    check_prompts(prompts, asked, limits, field)
    is_completion = isinstance(request, CompletionRequest)
    return Sampling(
        max_tokens=asked,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=request.stop_strings(),
        logprobs=request.logprobs if is_completion else None,
        echo=request.echo if is_completion else False,
    )
