"""Search a cached split with a trained run: live backbones and the fused encoder for the query (above extract/ and
fuse/, so that neither imports the other)."""
