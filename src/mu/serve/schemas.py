"""Request bodies of the server's endpoints, checked field by field (pydantic, strict types).

The OpenAI fields mu has no use for are accepted only at their neutral values (`presence_penalty: 0`,
`logprobs: null`, ...), so a client that sends its defaults works and one that asks for something mu
does not do gets a 400 naming the field. Unknown fields are refused the same way.
Extensions (as vLLM's): `top_k`, and `ignore_eos` (generate exactly `max_tokens` tokens).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_PROMPTS = 16  # prompts in one /v1/completions request


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False  # a last chunk with the usage counts (and no choices)


class _Generation(_Body):
    model: Optional[str] = None  # the served model's name (any other is a 404); omitted: the served model
    max_tokens: Optional[int] = Field(None, ge=1)  # default and upper limit: the server's --max-new-tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1)  # upper limit: the server's --max-batch
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    ignore_eos: bool = False
    user: Optional[str] = None
    # accepted only at their neutral values
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Union[bool, int, None] = None
    logit_bias: Optional[dict[str, Any]] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v != 0:
            raise ValueError("not supported by this server (only 0)")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v not in (None, False, 0):
            raise ValueError("not supported by this server (only null or false)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("not supported by this server (only null or {})")
        return v


class CompletionRequest(_Generation):
    prompt: Union[str, list[str], list[int]]  # text, several texts (one set of choices each), or token ids
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        if isinstance(v, list) and isinstance(v[0], str) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("not supported by this server (only false)")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("not supported by this server (only null)")
        return v


class ImageURL(_Body):
    url: str  # a data URI: data:image/png;base64,...
    detail: Optional[str] = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens


class AnswerRequest(_Body):
    """Reading comprehension with the squad_v2 task's prompt: the answer is a span of the context or
    the task's no-answer phrase."""

    context: str
    question: str
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)  # default: the squad_v2 evaluation budget
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # greedy by default, as evaluation
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


# -- validation errors -> (field, message) ---------------------------------------------------------

_FIELDS = {name for m in (CompletionRequest, ChatRequest, AnswerRequest, Message, ImagePart, TextPart, ImageURL,
                          StreamOptions) for name in m.model_fields}
_UNION_HINTS = {
    "prompt": "expected a string, a list of strings or a list of token ids",
    "stop": "expected a string or a list of strings",
    "content": "expected a string or a list of content parts ({'type': 'text' | 'image_url', ...})",
    "logprobs": "expected null or false",
}


def error_field(loc: tuple) -> str:
    """A pydantic error location -> the field as a client wrote it, e.g. messages[0].content[1].image_url.url."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELDS and not out.endswith(f".{part}") and out != part:
            out += f".{part}" if out else part
    return out or "body"


def describe(error: ValidationError) -> tuple[str, str]:
    """The most specific problem of a failed validation, as (field, "field: what is wrong")."""
    errors = error.errors(include_url=False)
    best = max(errors, key=lambda e: len([p for p in e["loc"] if isinstance(p, int) or p in _FIELDS]))
    field = error_field(best["loc"])
    if best["type"] == "extra_forbidden":  # the unknown name itself is the field
        parent = error_field(best["loc"][:-1])
        field = str(best["loc"][-1]) if parent == "body" else f"{parent}.{best['loc'][-1]}"
    leaf = field.rsplit(".", 1)[-1].split("[")[0]
    union_mismatch = len(errors) > 1 and all(error_field(e["loc"]) == field for e in errors)
    if best["type"] == "extra_forbidden":
        message = "unknown field"
    elif best["type"] == "missing":
        message = "required"
    elif union_mismatch and leaf in _UNION_HINTS:
        message = _UNION_HINTS[leaf]
    else:
        message = best["msg"].removeprefix("Value error, ")
        if best["type"] not in ("value_error",) and "input" in best and not isinstance(best["input"], (dict, list)):
            message += f" (got {_short(best['input'])})"
    return field, f"{field}: {message}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
