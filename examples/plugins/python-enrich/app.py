"""python-enrich: a Sandpipe plugin in Python (componentize-py) that calls a
REST API through wasi:http and emits the message enriched with the answer.

Built against the `plugin-http` world (the `plugin` world plus
`wasi:http/outgoing-handler`): the engine sends the request, and only to
the destinations of the plugin's `http.allow` list. In this world the
package's own `types` interface is `wit_world.imports.sandpipe_connector_types`
(wasi:http has a `types` too).

Config:
    url     the API's URL, with `{id}` replaced by the message id, e.g.
            `https://api.example.org/items/{id}`
    output  the output the enriched document is emitted to (must be granted)

200: emits `{"id": <message id>, "found": <the API's JSON>}`; 404: skips the
message; any other status: asks for a retry in 5 s. A destination outside
`http.allow` is refused by the engine (`HTTP-request-denied`): the message
fails with the denial in the status log.

Build: `just py-enrich` (../componentize-py.sh with `-w plugin-http`).
"""

import json
from urllib.parse import quote, urlsplit

import wit_world
from componentize_py_types import Err
from wit_world.imports import config, emit, log, outgoing_handler
from wit_world.imports.log import Level
from wit_world.imports.sandpipe_connector_types import (
    Capability,
    Description,
    Error_Invalid,
    Error_LimitExceeded,
    Error_Unavailable,
    Outcome_Done,
    Outcome_Retry,
    Outcome_Skip,
    RetryAfter,
)
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.wasi_http_types import (
    ErrorCode_HttpRequestDenied,
    Fields,
    Method_Get,
    OutgoingBody,
    OutgoingRequest,
    Scheme_Http,
    Scheme_Https,
)

VERSION = "0.1.0"
MAX_BODY = 1 << 20


class WitWorld(wit_world.WitWorld):
    def describe(self) -> Description:
        return Description(
            name="python-enrich",
            version=VERSION,
            mime_types=["application/json"],
            capabilities=[Capability.LOG, Capability.CONFIG, Capability.EMIT],
        )

    def execute(self, msg):
        template = config.get("url")
        output = config.get("output")
        if template is None or output is None:
            raise Err(Error_Invalid("config needs `url` (with {id}) and `output`"))
        url = template.replace("{id}", quote(msg.id, safe=""))
        status, body = get(url)
        if status == 404:
            return Outcome_Skip(f"{url}: not found")
        if status != 200:
            return Outcome_Retry(RetryAfter(5000, f"{url} answered {status}"))
        found = json.loads(body)
        doc = json.dumps({"id": msg.id, "found": found}, separators=(",", ":"))
        emit.publish(output, doc.encode(), [("content-type", "application/json")])
        log.write(Level.INFO, f"{msg.id}: enriched from {url}")
        return Outcome_Done()


def get(url):
    """GET `url` through wasi:http; (status, body bytes), the body at most
    MAX_BODY bytes. Failures raise the package's errors."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise Err(Error_Invalid(f"`{url}` is not an http(s) URL"))
    request = OutgoingRequest(Fields.from_list([("accept", b"application/json")]))
    request.set_method(Method_Get())
    request.set_scheme(Scheme_Https() if parts.scheme == "https" else Scheme_Http())
    request.set_authority(parts.netloc)
    path = parts.path or "/"
    request.set_path_with_query(f"{path}?{parts.query}" if parts.query else path)
    body = request.body()
    try:
        future = outgoing_handler.handle(request, None)
    except Err as e:
        raise Err(error(url, e.value))
    OutgoingBody.finish(body, None)
    with future:
        future.subscribe().block()
        answer = future.get()
    # option<result<result<incoming-response, error-code>>>: None until
    # ready; then Ok(Ok(response)) or Ok(Err(code)); Err(None) if taken.
    if answer is None or isinstance(answer, Err):
        raise Err(Error_Unavailable(f"GET {url}: the response was lost"))
    inner = answer.value
    if isinstance(inner, Err):
        raise Err(error(url, inner.value))
    response = inner.value
    status = response.status()
    incoming = response.consume()
    stream = incoming.stream()
    data = bytearray()
    try:
        while True:
            try:
                data += stream.blocking_read(65536)
            except Err as e:
                if isinstance(e.value, StreamError_Closed):
                    break
                raise Err(Error_Unavailable(f"GET {url}: reading the body failed"))
            if len(data) > MAX_BODY:
                raise Err(Error_LimitExceeded(f"GET {url}: the body is over {MAX_BODY} bytes"))
    finally:
        stream.__exit__(None, None, None)
        incoming.__exit__(None, None, None)
        response.__exit__(None, None, None)
    return status, bytes(data)


def error(url, code):
    """The package's error for a wasi:http error code."""
    if isinstance(code, ErrorCode_HttpRequestDenied):
        return Error_Invalid(
            f"GET {url}: denied by the engine (not in the plugin's `http.allow` list, "
            "or resolving to an address the list does not name)"
        )
    return Error_Unavailable(f"GET {url}: {type(code).__name__}")
