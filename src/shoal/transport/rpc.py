"""gRPC method handlers that hand a servicer each request as the bytes that arrived.

The registration protoc generates parses every request inside grpc, before
the servicer runs: bytes that protobuf cannot parse then raise there, the
caller gets ``UNKNOWN`` and the server logs a full traceback, once per
request, for any peer that cares to send garbage. Registered with
:func:`add_bytes_servicer` instead, each method of a service (unary or
streamed, either way) receives its request, or each part of its request
stream, as ``bytes``; the servicer parses it with
:func:`shoal.transport.serde.parse` and answers bytes it cannot parse with
its own verdict, like any other bad input. Responses are serialized as
usual.

>>> coordinator = pb.DESCRIPTOR.services_by_name["Coordinator"]  # doctest: +SKIP
>>> add_bytes_servicer(server, coordinator, service)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _handler(method: MethodDescriptor, behaviour: Any) -> grpc.RpcMethodHandler[Any, Any]:
    """The handler of one method, by its streaming kind, taking bytes (no deserializer)."""
    streaming = (method.client_streaming, method.server_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[streaming]
    return make(behaviour, request_deserializer=None, response_serializer=_serialize)


def bytes_method_handlers(
    service: ServiceDescriptor, servicer: object
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """A handler for every method of ``service``, calling the servicer's method of that name.

    A servicer that lacks one of the methods is a ``TypeError`` here, not a
    failure on the first call.
    """
    missing = [method.name for method in service.methods if not hasattr(servicer, method.name)]
    if missing:
        raise TypeError(f"{type(servicer).__name__} lacks the methods {missing} of {service.name}")
    return {
        method.name: _handler(method, getattr(servicer, method.name)) for method in service.methods
    }


def add_bytes_servicer(
    server: grpc.Server | grpc.aio.Server, service: ServiceDescriptor, servicer: object
) -> None:
    """Serve ``service`` on ``server`` with ``servicer``, which takes requests as bytes."""
    handlers = bytes_method_handlers(service, servicer)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
