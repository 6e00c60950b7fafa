"""Wire format: the only code that touches protobuf."""
