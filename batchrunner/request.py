"""Each row's request: its prompt, its body for a model, and its fingerprint. Pure.

The fingerprint is the checkpoint key's memory of everything that shapes a request: the
rendered prompt, the endpoint, params, provider, response_format and the model chain. A
rerun skips a (row, model) whose stored answer has the same fingerprint; editing the
prompt or params changes the fingerprint of exactly the rows whose request changes.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from typing import Any

from batchrunner.dataset import Row
from batchrunner.prompt import PromptTemplate
from batchrunner.spec import JobSpec


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


class RequestBuilder:
    """Builds what the engine sends and the store keys, from one spec."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.template: PromptTemplate = spec.prompt_template()
        self.prompt_field = "prompt" if spec.endpoint == "completions" else "messages"

    @cached_property
    def _shape_digests(self) -> dict[str, hashlib._Hash]:
        """Per requested model: a hash already fed with everything but the prompt."""
        digests = {}
        for model in self.spec.models:
            shape = {
                "endpoint": self.spec.endpoint,
                "chain": self.spec.model_chain(model),
                "params": self.spec.params,
                "provider": self.spec.provider,
                "response_format": self.spec.response_format,
            }
            digests[model] = hashlib.sha256(_canonical(shape))
        return digests

    def prompt(self, row: Row) -> Any:
        """The rendered messages (chat) or text (completions) for a row."""
        if self.spec.endpoint == "completions":
            return self.template.render_text(row.values)
        return self.template.render_messages(row.values)

    def body(self, prompt: Any, model: str) -> dict[str, Any]:
        body = self.spec.request_body(model)
        body[self.prompt_field] = prompt
        return body

    def fingerprint(self, prompt: Any, requested_model: str) -> str:
        digest = self._shape_digests[requested_model].copy()
        digest.update(_prompt_bytes(prompt))
        return digest.hexdigest()[:32]


def _prompt_bytes(prompt: Any) -> bytes:
    """An unambiguous encoding of a rendered prompt: length-prefixed parts, several times
    faster than canonical JSON, which matters at a million rows per resume."""
    if isinstance(prompt, str):
        parts = [prompt]
    else:
        parts = [text for message in prompt for text in (message["role"], message["content"])]
    return "".join(f"{len(part)}:{part}" for part in parts).encode()
