"""Generated protobuf and gRPC code for the fleetmend.v1 contract.

Do not edit the *_pb2* files by hand: change the .proto files beside them and
run ``make protos``.
"""
