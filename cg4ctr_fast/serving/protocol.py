"""The HTTP API's request and response bodies (pydantic models), and their one-line validation errors.

`cg4ctr serve` speaks JSON (and multipart/form-data for an uploaded product image). Every request body is
checked here; a body that does not fit is an `InputError` (HTTP 400) with one line naming the field, never
FastAPI's 422 list. The runtime checks what needs its state (known product and group ids, the image's bytes and
pixels) and raises `InputError` / `NotFound` itself.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cg4ctr_fast.errors import InputError, check_utf8
from cg4ctr_fast.serving.store import MAX_ID_CHARS  # the longest product / group id: the store's rule

__all__ = [
    "SEED_LIMIT",
    "CreativeOut",
    "GenerateBody",
    "GenerateResponse",
    "SelectBody",
    "check_seed",
    "creative_url",
    "parse_body",
    "selection_response",
]

# Seeds are stored in SQLite INTEGER columns and fed to torch.Generator.manual_seed: both take signed 64-bit
# values, so a seed is 0 ≤ seed < 2**63 (the runtime checks the same range with the same words).
SEED_LIMIT = 2**63


def creative_url(creative_id: str) -> str:
    """The path a creative's PNG is served at (relative to the server's base URL)."""
    return f"/v1/creatives/{creative_id}.png"


def _check_id(value: Any, what: str) -> str:
    # Ids arrive as JSON strings or numbers (a group id "3" and 3 name the same group), and as form text.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        got = "null" if value is None else type(value).__name__
        raise ValueError(f"must be a string or an integer, got {got}")
    text = str(value)
    if not text or len(text) > MAX_ID_CHARS:
        raise ValueError(f"must be 1 to {MAX_ID_CHARS} characters, got {len(text)}")
    return _utf8(text, what)


def check_seed(value: int) -> int:
    """`value` if 0 ≤ value < 2**63, else ValueError (one line)."""
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"must be an integer from 0 to 2**63 - 1, got {value}")
    return value


def _utf8(text: str, what: str) -> str:
    # A JSON "\ud800" escape decodes to a lone surrogate, which no tokenizer or SQLite text column can take.
    try:
        return check_utf8(text, what)
    except InputError as exc:
        raise ValueError(str(exc).removeprefix(f"{what} ")) from None


class _Body(BaseModel):
    # extra="forbid": a misspelt field ("prompt" for "prompts") is refused, not silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerateBody(_Body):
    """POST /v1/generate. With an uploaded `image` (multipart) it is stored as `product_id`'s original; without
    one, `product_id` must name a stored product.

    prompts: one per creative group (empty: the runtime's prompt model proposes one per group, when it has one).
    group_ids: the user group each prompt is scored for, in prompt order (may be empty when prompts are given).
    num_images_per_prompt: ≥ 1. seed: 0 ≤ seed < 2**63, mixed into every creative's seed. timeout_s: the
    request's deadline in seconds from arrival, > 0 (default: the server's --timeout-s); a request still queued
    then gets HTTP 504.
    """

    product_id: str
    prompts: list[str] = Field(default_factory=list)
    group_ids: list[str] = Field(default_factory=list)
    title: str = ""
    num_images_per_prompt: int = 1
    seed: int = 0
    timeout_s: Optional[float] = None

    @field_validator("product_id", mode="before")
    @classmethod
    def _product_id(cls, value: Any) -> str:
        return _check_id(value, "product_id")

    @field_validator("group_ids", mode="before")
    @classmethod
    def _group_ids(cls, value: Any) -> list[str]:
        if not isinstance(value, list):
            raise ValueError("group_ids must be a list")
        return [_check_id(v, "group_ids") for v in value]

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, value: list[str]) -> list[str]:
        # Omitted means "let the prompt model propose"; an explicit empty list is a mistake, refused.
        if not value:
            raise ValueError("must not be an empty list (omit it to have the prompt model propose one per group)")
        if any(not p.strip() for p in value):
            raise ValueError("a prompt must not be empty")
        return [_utf8(p, "prompts") for p in value]

    @field_validator("title")
    @classmethod
    def _title(cls, value: str) -> str:
        return _utf8(value, "title")

    @field_validator("num_images_per_prompt")
    @classmethod
    def _num_images(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be a positive integer, got {value}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int) -> int:
        return check_seed(value)

    @field_validator("timeout_s")
    @classmethod
    def _timeout(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"must be a positive number of seconds, got {value}")
        return value


class SelectBody(_Body):
    """POST /v1/select: the best stored creative of `product_id` for `group_id`, or the original and why.

    k: how many to return, best first, ≥ 1. budget_ms: the ranking's time budget in ms, > 0 (None: no budget);
    when it runs out the original is returned with fallback "budget".
    """

    product_id: str
    group_id: str
    k: int = 1
    budget_ms: Optional[float] = None

    @field_validator("product_id", "group_id", mode="before")
    @classmethod
    def _ids(cls, value: Any, info) -> str:
        return _check_id(value, info.field_name)

    @field_validator("budget_ms")
    @classmethod
    def _budget(cls, value: Optional[float]) -> Optional[float]:
        # JSON's Infinity / NaN parse as floats; an infinite budget is "no budget", which is null.
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"must be a positive number of milliseconds (or null for no budget), got {value}")
        return value


class CreativeOut(BaseModel):
    """One stored creative: its id (sha256 of the PNG file), where to fetch it, and its scores.

    reward: calibrated CTR in [0, 1] for its own group (None without a group); scores: group id → calibrated CTR.
    """

    id: str
    url: str
    group_id: Optional[str]
    prompt: str
    index: int
    seed: Optional[int]
    reward: Optional[float]
    scores: dict[str, float]


class GenerateResponse(BaseModel):
    """What POST /v1/generate returns: every creative made, and the original image's score per group.

    queued_ms / run_ms: time waiting in the queue / in its batch, ms; batch_creatives: creatives in that batch.
    """

    product_id: str
    model_id: str
    creatives: list[CreativeOut]
    original_scores: dict[str, float]
    queued_ms: float
    run_ms: float
    batch_creatives: int

    @classmethod
    def from_result(cls, result: Any) -> "GenerateResponse":
        """From a runtime `GenerateResult`."""
        return cls(
            product_id=result.product_id,
            model_id=result.model_id,
            creatives=[
                CreativeOut(id=c.creative_id, url=creative_url(c.creative_id), group_id=c.group_id, prompt=c.prompt,
                            index=c.index, seed=c.seed, reward=c.reward, scores=dict(c.scores))
                for c in result.creatives
            ],
            original_scores=dict(result.original_scores),
            queued_ms=result.queued_ms,
            run_ms=result.run_ms,
            batch_creatives=result.batch_creatives,
        )


def selection_response(selection: Any) -> dict:
    """A runtime `Selection` as JSON: `Selection.to_dict()` plus each chosen creative's `url` (None for the
    original image, which the caller already holds)."""
    out = selection.to_dict()
    for choice in out.get("chosen", ()):
        ident = choice.get("id")
        choice["url"] = creative_url(ident) if isinstance(ident, str) and ident != "original" else None
    return out


_TYPE_WORDS = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
               "string_type": "a string", "list_type": "a list", "bool_type": "true or false"}


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return f"{value!r}"
    return {"list": "a list", "dict": "an object"}.get(type(value).__name__, type(value).__name__)


def _one_line(error: ValidationError) -> str:
    """pydantic's first error as one line naming the field: `prompts: a prompt must not be empty`."""
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "body"
    message = str(first.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    kind = first.get("type")
    if kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "missing":
        message = "required"
    elif kind in _TYPE_WORDS:
        # Strict JSON: `true` or `"2"` is not the integer 2; name what was sent, as JSON spells it.
        message = f"must be {_TYPE_WORDS[kind]}, got {_json_kind(first.get('input'))}"
    return " ".join(f"{where}: {message}".split())


def parse_body(model: type[BaseModel], data: Union[bytes, Mapping[str, Any]]) -> Any:
    """Validate a JSON body (bytes) or form fields (a mapping) against `model`; InputError (one line) if not.

    JSON is strict: an integer field takes a JSON integer only (not `true`, `"2"` or `2.0`), a number field a
    JSON number. Form fields are text by nature and are parsed as numbers where the field is one ("2" → 2).
    """
    try:
        if isinstance(data, (bytes, bytearray)):
            return model.model_validate_json(data, strict=True)
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise InputError(_one_line(exc)) from None
