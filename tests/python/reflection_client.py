#!/usr/bin/env python3
"""A gRPC client geokv did not write: it knows nothing of geokv's protos.

Everything it needs comes from the node's server reflection: the list of
services, then the descriptors of the request and response messages, from
which it builds message classes at run time and calls KV.Put and KV.Get.

Usage: reflection_client.py HOST:PORT [CERTS_DIR]
With CERTS_DIR, the client speaks mutual TLS with the cluster's `ca.crt`
and `root`'s client certificate (`client.root.crt`/`.key`), as geokv
nodes require; without it, plaintext (a node run with --insecure).
Needs: pip install grpcio grpcio-reflection protobuf
Prints one `ok: ...` line per check and `PASS` at the end; exits 1 with a
`FAIL: ...` line on the first failed check, 2 on a usage or import problem.
"""

import sys
import uuid

PIP_HINT = "pip install grpcio grpcio-reflection protobuf"

try:
    import grpc
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
except ImportError as e:  # pragma: no cover - exercised when CI lacks the packages
    print(f"MISSING_PYTHON_PACKAGES: {e}; install them with: {PIP_HINT}", file=sys.stderr)
    sys.exit(2)

EXPECTED_SERVICES = {"geokv.v1.KV", "geokv.v1.Admin", "grpc.health.v1.Health"}
# Node-to-node services: served on the peer port only, never listed here.
INTERNAL_SERVICES = {"geokv.v1.Replication", "geokv.consensus.v1.Consensus"}
# Bound on every call, in seconds: a hung node fails the check instead of the test run.
CALL_TIMEOUT_S = 10


def fail(message):
    print(f"FAIL: {message}", flush=True)
    sys.exit(1)


def unary(channel, pool, method_path):
    """A callable for `/package.Service/Method`, typed from reflected descriptors."""
    service_name, method_name = method_path.strip("/").split("/")
    method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        method_path,
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    return request_cls, call


def main():
    if len(sys.argv) not in (2, 3):
        print(f"usage: {sys.argv[0]} HOST:PORT [CERTS_DIR]", file=sys.stderr)
        sys.exit(2)
    target = sys.argv[1]
    if len(sys.argv) == 3:
        certs = sys.argv[2]

        def read(name):
            with open(f"{certs}/{name}", "rb") as f:
                return f.read()

        credentials = grpc.ssl_channel_credentials(
            root_certificates=read("ca.crt"),
            private_key=read("client.root.key"),
            certificate_chain=read("client.root.crt"),
        )
        opened = grpc.secure_channel(target, credentials)
    else:
        opened = grpc.insecure_channel(target)
    with opened as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            fail(f"cannot connect to {target} within {CALL_TIMEOUT_S}s")

        reflection_db = ProtoReflectionDescriptorDatabase(channel)
        services = set(reflection_db.get_services())
        missing = EXPECTED_SERVICES - services
        if missing:
            fail(f"reflection lists {sorted(services)}, missing {sorted(missing)}")
        print(f"ok: services {' '.join(sorted(services))}", flush=True)
        internal = INTERNAL_SERVICES & services
        if internal:
            fail(f"reflection on the client port lists internal services {sorted(internal)}")
        print("ok: no internal service listed", flush=True)

        pool = descriptor_pool.DescriptorPool(reflection_db)

        # Health, typed from reflection like everything else.
        health_req, health_check = unary(channel, pool, "/grpc.health.v1.Health/Check")
        health = health_check(health_req(service="geokv.v1.KV"), timeout=CALL_TIMEOUT_S)
        status_name = health.DESCRIPTOR.fields_by_name["status"].enum_type.values_by_number[health.status].name
        if status_name != "SERVING":
            fail(f"health of geokv.v1.KV is {status_name}")
        print("ok: health SERVING", flush=True)

        put_req_cls, put = unary(channel, pool, "/geokv.v1.KV/Put")
        get_req_cls, get = unary(channel, pool, "/geokv.v1.KV/Get")
        row_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("geokv.v1.RowRef"))

        key = f"py-{uuid.uuid4().hex}".encode()
        value = "grüße from python".encode()
        row = row_cls(table="default", key=key)
        put_resp = put(put_req_cls(row=row, value=value), timeout=CALL_TIMEOUT_S)
        if not put_resp.HasField("ack") or not put_resp.ack.context:
            fail(f"Put reply has no acknowledgement with a context: {put_resp}")
        print(f"ok: put home_region={put_resp.ack.home_region} hlc={put_resp.ack.hlc}", flush=True)

        got = get(get_req_cls(row=row), timeout=CALL_TIMEOUT_S)
        values = [s.value for s in got.siblings]
        if not got.found or values != [value]:
            fail(f"Get returned found={got.found} values={values!r}, expected [{value!r}]")
        print(f"ok: get {value.decode()}", flush=True)

        # A refusal reaches this client as a status code and a reason it can read.
        try:
            get(get_req_cls(row=row_cls(table="no_such_table", key=key)), timeout=CALL_TIMEOUT_S)
            fail("Get on an unknown table succeeded")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND or not e.details().startswith("UNKNOWN_TABLE"):
                fail(f"unknown table gave {e.code()} {e.details()!r}")
        print("ok: unknown table NOT_FOUND UNKNOWN_TABLE", flush=True)

    print("PASS", flush=True)


if __name__ == "__main__":
    main()
