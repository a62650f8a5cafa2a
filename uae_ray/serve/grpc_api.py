"""gRPC search beside HTTP: the ``uae_ray.Retrieval`` service of ``retrieval.proto``, served by Ray Serve's gRPC
proxy and answered by the same ``Retriever`` ingress as ``POST /search``.

The message classes are built here from a descriptor written in Python (what protoc's ``_pb2`` output does, without
needing protoc / grpcio-tools at build time); ``retrieval.proto`` beside this file is the same definition for
clients in other languages. Start Serve with ``grpc_options={"port": ..., "grpc_servicer_functions":
[uae_ray.serve.app.GRPC_SERVICER]}``; call it with :class:`RetrievalStub`. Serve's gRPC proxy listens on every
interface: the ingress's token check (metadata ``authorization: Bearer <token>``; without a token configured, only
loopback peers) applies to gRPC exactly as to HTTP.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.internal import builder as _builder

SERVICE = "uae_ray.Retrieval"
_F = descriptor_pb2.FieldDescriptorProto
#: message -> [(field, number, type, label, optional, message type)]; the schema of retrieval.proto
MESSAGES: dict[str, list[tuple[str, int, int, int, bool, str | None]]] = {
    "SearchRequest": [
        ("query", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, False, None),
        ("queries", 2, _F.TYPE_STRING, _F.LABEL_REPEATED, False, None),
        ("k", 3, _F.TYPE_INT32, _F.LABEL_OPTIONAL, True, None),
        ("min_expected_utility", 4, _F.TYPE_DOUBLE, _F.LABEL_OPTIONAL, True, None),
        ("max_context_tokens", 5, _F.TYPE_INT32, _F.LABEL_OPTIONAL, True, None),
    ],
    "Hit": [
        ("rank", 1, _F.TYPE_INT32, _F.LABEL_OPTIONAL, False, None),
        ("pid", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, False, None),
        ("doc_id", 3, _F.TYPE_STRING, _F.LABEL_OPTIONAL, False, None),
        ("score", 4, _F.TYPE_DOUBLE, _F.LABEL_OPTIONAL, False, None),
        ("expected_utility", 5, _F.TYPE_DOUBLE, _F.LABEL_OPTIONAL, True, None),
        ("n_tokens", 6, _F.TYPE_INT32, _F.LABEL_OPTIONAL, True, None),
        ("text", 7, _F.TYPE_STRING, _F.LABEL_OPTIONAL, False, None),
    ],
    "QueryResult": [
        ("query", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, False, None),
        ("hits", 2, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, False, ".uae_ray.Hit"),
    ],
    "SearchResponse": [
        ("results", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, False, ".uae_ray.QueryResult"),
        ("k", 2, _F.TYPE_INT32, _F.LABEL_OPTIONAL, False, None),
        ("version", 3, _F.TYPE_STRING, _F.LABEL_OPTIONAL, False, None),
        ("timing_ms", 4, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, False, ".uae_ray.SearchResponse.TimingMsEntry"),
    ],
}


def _file_descriptor() -> bytes:
    f = descriptor_pb2.FileDescriptorProto(name="uae_ray/serve/retrieval.proto", package="uae_ray", syntax="proto3")
    for name, fields in MESSAGES.items():
        m = f.message_type.add(name=name)
        for field, number, ftype, label, optional, type_name in fields:
            fd = m.field.add(name=field, number=number, type=ftype, label=label, json_name=field)
            if type_name:
                fd.type_name = type_name
            if optional:  # proto3 `optional`: a synthetic oneof, so presence is known (HasField)
                fd.proto3_optional = True
                fd.oneof_index = len(m.oneof_decl)
                m.oneof_decl.add(name=f"_{field}")
        if name == "SearchResponse":
            entry = m.nested_type.add(name="TimingMsEntry")
            entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL, json_name="key")
            entry.field.add(name="value", number=2, type=_F.TYPE_DOUBLE, label=_F.LABEL_OPTIONAL, json_name="value")
            entry.options.map_entry = True
    service = f.service.add(name="Retrieval")
    service.method.add(name="Search", input_type=".uae_ray.SearchRequest", output_type=".uae_ray.SearchResponse")
    return f.SerializeToString()


DESCRIPTOR = descriptor_pool.Default().AddSerializedFile(_file_descriptor())
_builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, globals())
_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, __name__, globals())
SearchRequest: Any = globals()["SearchRequest"]
SearchResponse: Any = globals()["SearchResponse"]


def add_RetrievalServicer_to_server(servicer: Any, server: Any) -> None:
    """Register ``uae_ray.Retrieval`` on ``server`` (what Serve's gRPC proxy calls with its own servicer)."""
    import grpc

    handlers = {"Search": grpc.unary_unary_rpc_method_handler(
        servicer.Search, request_deserializer=SearchRequest.FromString,
        response_serializer=SearchResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class RetrievalStub:
    """Client: ``RetrievalStub(grpc.insecure_channel("127.0.0.1:9000")).Search(SearchRequest(query=...),
    metadata=[("authorization", "Bearer <token>")])``."""

    def __init__(self, channel: Any) -> None:
        self.Search = channel.unary_unary(f"/{SERVICE}/Search", request_serializer=SearchRequest.SerializeToString,
                                          response_deserializer=SearchResponse.FromString)


def _peer_host(peer: str) -> str:
    """The address of a gRPC peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``); "" when unknown."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return ""
    return rest.rsplit(":", 1)[0].strip("[]")


#: HTTP status of the ingress's checks -> gRPC status code name
STATUS = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 413: "RESOURCE_EXHAUSTED", 422: "INVALID_ARGUMENT",
          503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


async def handle(retriever: Any, request: Any, context: Any) -> Any:
    """Answer one ``Search`` RPC with ``retriever``'s checks and search (an ``uae_ray.serve.app.Retriever``)."""
    import time

    import grpc
    from fastapi import HTTPException
    from fastapi.security import HTTPAuthorizationCredentials
    from pydantic import ValidationError

    from uae_ray.serve.api import SearchRequest as Body
    from uae_ray.serve.app import validation_message

    t0 = time.perf_counter()
    try:
        metadata = dict(context.invocation_metadata()) if context is not None else {}
        scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
        creds = (HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip())
                 if scheme.lower() == "bearer" and token.strip() else None)
        retriever.guard.authorize(_peer_host(context.peer()) if context is not None else "", creds)
        fields: dict[str, Any] = {}  # proto3 cannot tell "" / [] from absent: empty counts as not given
        if request.query:
            fields["query"] = request.query
        if request.queries:
            fields["queries"] = list(request.queries)
        for name in ("k", "min_expected_utility", "max_context_tokens"):
            if request.HasField(name):
                fields[name] = getattr(request, name)
        try:
            body = Body.model_validate(fields)
        except ValidationError as e:
            raise HTTPException(422, validation_message(e.errors())) from e
        retriever._check(body)
        answer = await retriever._timed(retriever._answer(retriever._texts(body), None, body, t0))
    except HTTPException as e:
        if context is not None:
            context.set_code(getattr(grpc.StatusCode, STATUS.get(e.status_code, "UNKNOWN")))
            context.set_details(str(e.detail))
        return SearchResponse()
    return SearchResponse(**answer.model_dump(exclude_none=False, mode="python", exclude={"results"}),
                          results=[{"query": r.query or "",
                                    "hits": [{k: v for k, v in h.model_dump().items() if v is not None}
                                             for h in r.hits]} for r in answer.results])
