"""Graph capture and graph rewrites: `capture` (export wrapper), `kv_compress` (the K/V rewrite), `fuse_attention`,
`decode_key_range` (a decode step's mask as a key range), `values_per_token` (V's layout for ONNX / TensorRT), and
`split_by_layer` (one submodule per decoder layer, for regional compilation)."""
