"""gRPC servicers: protobuf <-> domain conversion and error mapping, one module per service."""
