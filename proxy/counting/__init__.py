"""Counting tokens locally, with tiktoken and no network, when an upstream reports no usage.

Most streaming clients don't ask for `stream_options.include_usage`, so a chat stream carries no usage.
This package counts what was sent and what came back, exactly where OpenAI's rules are known (plain
messages, text output, refusals, single tool calls) and as a flagged estimate elsewhere (tool
definitions, schemas, images, other vendors' models). Every count says which it is.

Typical use::

    preload()                                          # at start-up: a broken install fails here
    name, exact = encoding_for(model, "o200k_base", overrides)
    encoding = get_encoding(name)
    prompt = count_request(path, body, encoding, exact_encoding=exact)
    output = StreamOutput()
    for chunk in parsed_chunks:
        output.feed(chunk)
    completion = output.count(encoding, exact_encoding=exact, reasoning_model=is_reasoning_model(model))

Counting is CPU work (about 0.1-0.3 ms per 1,000 tokens); run large bodies off the event loop. Nothing
here does I/O after the encodings are loaded, and nothing here raises on a malformed body or chunk;
only loading raises `CountingError` (and `count_text` on a tokenizer failure).
"""

from __future__ import annotations

from proxy.counting.encodings import (
    DEFAULT_ENCODING,
    ENCODINGS,
    CountingError,
    EncodingStore,
    count_text,
    encoding_for,
    get_encoding,
    is_reasoning_model,
    preload,
    verify,
)
from proxy.counting.images import data_url_image_size, image_size, image_tokens
from proxy.counting.output import StreamOutput
from proxy.counting.prompt import (
    count_chat_prompt,
    count_completion_prompt,
    count_embedding_input,
    count_request,
    count_responses_input,
)
from proxy.counting.tally import TokenCount

__all__ = [
    "DEFAULT_ENCODING", "ENCODINGS", "CountingError", "EncodingStore", "StreamOutput", "TokenCount",
    "count_chat_prompt", "count_completion_prompt", "count_embedding_input", "count_request",
    "count_responses_input", "count_text", "data_url_image_size", "encoding_for", "get_encoding",
    "image_size", "image_tokens", "is_reasoning_model", "preload", "verify",
]
