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
usual. With an ``observe`` callback (the coordinator's Prometheus metrics),
every call is timed and reported with its method and its verdict
(:func:`~shoal.transport.serde.verdict_label`; a call that ends in an error
status reports the status, ``permission_denied``...).

>>> coordinator = pb.DESCRIPTOR.services_by_name["Coordinator"]  # doctest: +SKIP
>>> add_bytes_servicer(server, coordinator, service)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from shoal.transport.serde import verdict_label

RpcObserver = Callable[[str, str, float], None]
"""Told of each call served: its method, its verdict and how long it took, in seconds."""


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


def _failed(context: Any, error: BaseException) -> str:
    """The verdict of a call that raised: the status it was aborted with, else ``error``."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "cancelled"  # the caller went away
    code = context.code() if hasattr(context, "code") else None
    return code.name.lower() if isinstance(code, grpc.StatusCode) else "error"


def _observed(method: MethodDescriptor, behaviour: Any, observe: RpcObserver) -> Any:
    """``behaviour`` (an async servicer method), timed and reported to ``observe``."""
    name = method.name
    if method.server_streaming:

        async def streamed(request: Any, context: Any) -> AsyncIterator[Message]:
            started, verdict = time.perf_counter(), "error"
            try:
                async for response in behaviour(request, context):
                    yield response
                verdict = "ok"
            except BaseException as error:
                verdict = _failed(context, error)
                raise
            finally:
                observe(name, verdict, time.perf_counter() - started)

        return streamed

    async def answered(request: Any, context: Any) -> Message:
        started, verdict = time.perf_counter(), "error"
        try:
            response: Message = await behaviour(request, context)
            verdict = verdict_label(response)
            return response
        except BaseException as error:
            verdict = _failed(context, error)
            raise
        finally:
            observe(name, verdict, time.perf_counter() - started)

    return answered


def bytes_method_handlers(
    service: ServiceDescriptor, servicer: object, *, observe: RpcObserver | None = None
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """A handler for every method of ``service``, calling the servicer's method of that name.

    A servicer that lacks one of the methods is a ``TypeError`` here, not a
    failure on the first call. ``observe`` (an asynchronous servicer's only) is told
    of every call.
    """
    missing = [method.name for method in service.methods if not hasattr(servicer, method.name)]
    if missing:
        raise TypeError(f"{type(servicer).__name__} lacks the methods {missing} of {service.name}")
    handlers = {}
    for method in service.methods:
        behaviour = getattr(servicer, method.name)
        if observe is not None:
            behaviour = _observed(method, behaviour, observe)
        handlers[method.name] = _handler(method, behaviour)
    return handlers


def add_bytes_servicer(
    server: grpc.Server | grpc.aio.Server,
    service: ServiceDescriptor,
    servicer: object,
    *,
    observe: RpcObserver | None = None,
) -> None:
    """Serve ``service`` on ``server`` with ``servicer``, which takes requests as bytes."""
    handlers = bytes_method_handlers(service, servicer, observe=observe)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
