"""Cut the schemas batchrunner needs out of OpenRouter's published OpenAPI document.

The full document is 1.3 MB of YAML; batchrunner needs `ChatRequest` (to refuse requests
OpenRouter would refuse) and the responses the sandbox imitates (`ChatResult`,
`GenerationResponse`, `ModelsListResponse`, and the responses of GET /key and GET
/models/{author}/{slug}/endpoints, which the document writes inline and are kept here as
`KeyResponse` and `EndpointsResponse`), with every schema they reference. Run it when OpenRouter
publishes a new document:

    python scripts/extract_openapi_subset.py ../shared/reference/openrouter-openapi.yaml
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOTS = (
    "ChatRequest",
    "ChatResult",
    "ChatStreamChunk",
    "GenerationResponse",
    "ModelsListResponse",
    "ListEndpointsResponse",
    # the error envelopes the sandbox sends, by status
    "BadRequestResponse",
    "UnauthorizedResponse",
    "PaymentRequiredResponse",
    "NotFoundResponse",
    "TooManyRequestsResponse",
    "InternalServerResponse",
    "BadGatewayResponse",
    "ServiceUnavailableResponse",
)
INLINE = {
    "KeyResponse": ("/key", "get"),
    "EndpointsResponse": ("/models/{author}/{slug}/endpoints", "get"),
}  # response schemas written inline in `paths`, given a name here
TARGET = Path(__file__).resolve().parent.parent / "batchrunner" / "schemas" / "openrouter.json"


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value.rsplit("/", 1)[-1]
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def main(source: str) -> None:
    document = yaml.load(Path(source).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schemas = dict(document["components"]["schemas"])
    for name, (path, method) in INLINE.items():
        schemas[name] = document["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
    needed: set[str] = set()
    todo = [*ROOTS, *INLINE]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(_refs(schemas[name]))
    subset = {
        "$comment": f"Subset of OpenRouter's OpenAPI document ({document['info'].get('version', '?')}): {', '.join([*ROOTS, *INLINE])} and what they reference. Regenerate with scripts/extract_openapi_subset.py.",
        "components": {"schemas": {name: schemas[name] for name in sorted(needed)}},
    }
    TARGET.write_text(json.dumps(subset, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(needed)} schemas to {TARGET}")


if __name__ == "__main__":
    main(sys.argv[1])
