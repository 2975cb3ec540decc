"""TF Serving's gRPC services and the messages they carry, generated from
TensorFlow's and TF Serving's .proto files (Apache License 2.0: LICENSE
beside this file) by scripts/gen_protos.py, under this package so that the
TF Serving backend imports no TensorFlow. The .proto files keep their own
names and packages: what goes on the wire is TF Serving's. Do not edit:
regenerate."""
