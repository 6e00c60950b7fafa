"""Worker: a gRPC server holding a contiguous slice of a model\x27s layers."""
