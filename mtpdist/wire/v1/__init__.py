"""Generated protobuf code for mtpdist.v1 (do not edit; run scripts/gen_proto.py)."""
