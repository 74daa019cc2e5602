"""The OpenAI-compatible request bodies: checked field by field into engine options, or an ``ApiError``
naming the field (answered as 400 with an OpenAI-style error body). No web framework here, so the rules are
tested on their own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

# l2pd's own options, accepted as extra body fields (the openai client's ``extra_body=``); defaults are the
# engine's (the default decoding stored with the server's filter, learn2pd at its operating point for a filter
# tuned alone, threshold 0.9 at block 32 without one; dual cache with the window refresh)
L2PD_FIELDS = ("strategy", "threshold", "block_length", "eotp", "cache", "refresh", "steps", "persist",
               "edit_threshold", "edit_steps")
SERVER_DEFAULTS = dict(cache="dual", refresh="window")
STRATEGIES = ("steps", "threshold", "margin", "persistence", "learn2pd")
# OpenAI fields the server cannot honour: refused unless neutral (value: what counts as neutral)
NEUTRAL = {"top_p": (1, 1.0), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "best_of": (1,),
           "echo": (False,), "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}),
           "suffix": (None, ""), "tools": (None, []), "functions": (None, []), "response_format": (None,),
           "n": (1,)}


class ApiError(Exception):
    """An error answered as JSON: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Parsed:
    """A checked request: the prompt's token ids, the engine options, and what the response needs."""

    prompt_ids: list[int]
    options: dict[str, Any]
    stop: list[str]
    stream: bool
    include_usage: bool
    chat: bool
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body


def parse_request(body: dict[str, Any], tokenizer: Any, chat: bool, max_length: int,
                  default_max_tokens: int = 256) -> Parsed:
    """Check an OpenAI completions (``chat=False``) or chat completions body; see ``ApiError``."""
    for name, neutral in NEUTRAL.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in neutral):
            what = "n > 1 (one answer per request)" if name == "n" else f"{name}={body[name]!r}"
            raise ApiError(400, f"{what} is not supported by this server", name)
    if chat:
        prompt_ids = _chat_prompt(body.get("messages"), tokenizer)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    else:
        prompt_ids = _completion_prompt(body.get("prompt"), tokenizer)
        max_tokens, max_name = body.get("max_tokens"), "max_tokens"
    if max_tokens is None:
        max_tokens = min(default_max_tokens, max_length - len(prompt_ids))
    max_tokens = _int(max_name, max_tokens, 1)
    if len(prompt_ids) + max_tokens > max_length:
        raise ApiError(400, f"the prompt's {len(prompt_ids)} tokens + {max_name}={max_tokens} exceed the "
                            f"server's maximum length of {max_length} tokens", max_name)
    options: dict[str, Any] = dict(SERVER_DEFAULTS, max_new_tokens=max_tokens)
    temperature = body.get("temperature")
    if temperature is not None:
        options["temperature"] = _number("temperature", temperature, 0.0)
    seed = body.get("seed")
    if seed is not None:
        options["seed"] = _int("seed", seed, 0)
    for name in L2PD_FIELDS:
        if body.get(name) is not None:
            options[name] = _l2pd_field(name, body[name])
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stops = list(stop)
    else:
        raise ApiError(400, "stop must be a string or a list of up to 16 strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model must be a string", "model")
    return Parsed(prompt_ids, options, [s for s in stops if s], stream, bool(opts.get("include_usage")), chat, model)


def _completion_prompt(prompt: Any, tokenizer: Any) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt")
        return tokenizer(prompt)["input_ids"]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, "one prompt per request (a list of several prompts is a batch; send them as "
                            "separate requests)", "prompt")
    if prompt is None:
        raise ApiError(400, "prompt is required", "prompt")
    raise ApiError(400, "prompt must be a non-empty string or a non-empty list of token ids", "prompt")


def _chat_prompt(messages: Any, tokenizer: Any) -> list[int]:
    if messages is None:
        raise ApiError(400, "messages is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}] must be an object with role system, user or assistant",
                           f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    text = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", name)
    if value < low:
        raise ApiError(400, f"{name} must be >= {low}, got {value}", name)
    return value


def _number(name: str, value: Any, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, got {value!r}", name)
    if value < low:
        raise ApiError(400, f"{name} must be >= {low}, got {value}", name)
    return float(value)


def _l2pd_field(name: str, value: Any) -> Any:
    if name == "strategy":
        if value not in STRATEGIES:
            raise ApiError(400, f"strategy {value!r}: expected one of {list(STRATEGIES)}", name)
        return value
    if name in ("threshold", "edit_threshold"):
        return _number(name, value, 0.0)
    if name == "edit_steps":
        return _int(name, value, 0)
    if name in ("block_length", "steps", "persist"):
        return _int(name, value, 1)
    if name == "eotp":
        if value in (True, False, "off", "accepted", "predicted"):
            return value
        raise ApiError(400, f"eotp {value!r}: expected true, false, 'accepted' or 'predicted'", name)
    choices = {"cache": ("none", "prefix", "dual"), "refresh": ("full", "tail", "window")}[name]
    if value not in choices:
        raise ApiError(400, f"{name} {value!r}: expected one of {list(choices)}", name)
    return value


# engine messages name generate's arguments; the API's field names
_FIELD_OF = {"edit_steps": "edit_steps", "edit_threshold": "edit_threshold",  # before "steps" and "threshold"
             "max_new_tokens": "max_tokens", "input_ids": "prompt", "prompt": "prompt", "mask token": "prompt",
             "block_length": "block_length", "threshold": "threshold", "strategy": "strategy", "eotp": "eotp",
             "temperature": "temperature", "seed": "seed", "steps": "steps", "filter": "strategy",
             "persist": "persist"}


def engine_error(exc: ValueError) -> ApiError:
    """A request the engine refused, as a 400 naming the API field."""
    msg = str(exc)
    param = next((f for key, f in _FIELD_OF.items() if key in msg), None)
    return ApiError(400, msg.replace("max_new_tokens", "max_tokens"), param)
