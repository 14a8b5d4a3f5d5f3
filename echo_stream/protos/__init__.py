"""Wire protocol of ``echo-stream serve``: ``echo_stream_pb2`` (from ``protos/echo_stream.proto``).

Which protobuf runtimes the committed module runs on, and why
=============================================================

echo-stream has to install beside Pipecat (``pipecat-ai`` 1.14 wants
``protobuf>=5.29.6,<7``), LiveKit Agents and gRPC's own health-checking and
reflection packages, which pin one protobuf major per release. So the committed
``echo_stream_pb2.py`` must import, without an error or a warning, on every
protobuf runtime from 5.29.6 to 7.x. Plain protoc output cannot do that:

* protoc's Python output (checked: 5.27.2 to 7.35.1) begins with
  ``_runtime_version.ValidateProtobufRuntimeVersion(PUBLIC, major, minor, patch,
  ...)``, which raises ``VersionError`` when the runtime is older than the
  protoc that generated the module. Output of protoc 35 (7.35.1) therefore
  refuses every 5.x and 6.x runtime.
* Protobuf's documented guarantee
  (https://protobuf.dev/support/cross-version-runtime-guarantee) is: new gencode
  on an old runtime is never allowed; gencode of major V is supported by runtimes
  V and V+1, and V+2 is unsupported ("poison pills" announced). So output of
  protoc 29 (5.29.x) is covered on 5.x and 6.x runtimes but not on 7.x, and no
  single protoc's output is covered on 5.29 through 7.x.
* Reading ``google/protobuf/runtime_version.py`` of 5.28.3, 5.29.1-5.29.6, nine
  releases from 6.30.0 to 6.33.6 and 7.34.0/7.35.1/7.36.2: 5.28.3, 5.29.1-5.29.5
  and 6.30.0-6.31.1 compare majors and *warn* ("exactly one major version older
  than the runtime") on gencode one major behind, so 5.29 output warns on 6.30
  and 6.31. 5.29.6, 6.32.0-6.33.6 and the 7.x ones only refuse gencode newer
  than themselves: 5.29 output imports silently on 7.x today, but outside the
  guarantee, and a future 7.x may add the announced V+2 check.

Design: the module is protoc's output with the version check taken out, and
nothing else changed. ``python -m echo_stream.protos.build`` runs protoc
(grpcio-tools) and removes exactly the ``runtime_version`` import and the
``ValidateProtobufRuntimeVersion(...)`` call (adding a two-line comment that
says so). What remains is the serialized
``FileDescriptorProto`` plus calls to ``descriptor_pool.Default().AddSerializedFile``
and ``google.protobuf.internal.builder`` (``BuildMessageAndEnumDescriptors``,
``BuildTopDescriptorsAndMessages``): the runtime API that generated code itself
uses. For this .proto that body is byte for byte what protoc 29 (5.29.0),
protoc 31 (6.31.1) and protoc 35 (7.35.1) emit; only the version stamp differs.
So on a 5.29.x or 6.x runtime the module *is* 5.29.0 gencode (same major or
one behind: supported), and on a 7.x runtime it *is* 6.31.1 gencode (one major
behind: supported): every runtime in the range runs code its guarantee covers,
and none of them is asked to compare versions. The bound ``protobuf>=5.29.6,<8`` in pyproject.toml is that range
(5.29.6 because Pipecat asks for it; 5.29.0-5.29.5 would run it too); 8.x is
excluded until someone has checked it.

What keeps this honest:

* :mod:`echo_stream.protos.build` refuses a protoc outside 29-35 (protobuf
  python 5.29-7.x), and fails if protoc's output no longer has the expected
  version-check block.
* ``tests/test_serve_protocol.py`` checks that the committed module equals the
  build of a fresh protoc run (apart from the generator line), that its
  descriptor equals the ``.proto``'s, and that it imports and round-trips
  messages under the installed runtime with no warning.
* ``tests/test_protobuf_matrix.py`` (``ECHO_STREAM_PROTOBUF_MATRIX=1``) makes a
  venv per runtime (5.29.6, 6.31.1, newest 6.x, the installed 7.x), imports the
  module by path, round-trips messages under the upb and the pure-Python
  implementation, and fails on any warning. docs/serving.md lists the results.

Rejected: committing protoc 29 output as is (warns on 6.30/6.31, outside the
guarantee on 7.x); building the message classes by hand from the descriptor
with ``message_factory`` (works, but is no longer what protoc writes, so no
guarantee speaks for it); setting
``TEMPORARILY_DISABLE_PROTOBUF_VERSION_CHECK`` (process-wide: it would silence
the check for every other package's stubs too).
"""
