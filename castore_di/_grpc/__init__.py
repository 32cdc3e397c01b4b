"""The gRPC engine: channel and call plumbing of the clients (:mod:`.channel`) and the wire
contract client and server share (:mod:`.wire`). Knows no service kind; grpc is imported on
first use, not at import time.
"""
