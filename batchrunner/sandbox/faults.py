"""The faults the sandbox can simulate, by name: light enough for the CLI to list without starting it."""

FAULT_KINDS = (
    "rate_limit",  # 429 with Retry-After
    "in_flight_budget",  # 402 with limit_source openrouter_in_flight_budget and Retry-After
    "server_error",  # 500
    "bad_gateway",  # 502
    "overloaded",  # 503
    "error_in_200",  # a 200 whose body is only {"error": ...}
    "finish_error",  # a 200 whose choice has finish_reason "error"
    "empty",  # a 200 with empty content
    "invalid_json",  # a json_schema answer that is not valid JSON
    "schema_violation",  # a json_schema answer that is JSON but misses a required property
    "refusal",  # the model refuses: message.refusal set, no content
    "drop",  # the connection is closed without an answer
    "huge_tokens",  # a 200 whose usage.prompt_tokens is 2^70 (a malformed reply)
    "content_object",  # a 200 whose message.content is an object, not a string (a malformed reply)
    "negative_cost",  # a 200 whose usage.cost is -15
    "absurd_cost",  # a 200 whose usage.cost is 1e30
    "hostile_error",  # a 400 whose message carries terminal escapes (title, clipboard, clear screen) and 2 MB of text
    "stream_error",  # a streamed answer that breaks halfway with an error chunk (finish_reason "error"), unbilled
    "stream_cut",  # a streamed answer whose connection closes halfway, without a finish_reason or [DONE], unbilled
    "flex_capacity",  # a request asking service_tier flex of a model with a flex tier: 429, no flex capacity now
)
STREAM_FAULTS = ("stream_error", "stream_cut")
