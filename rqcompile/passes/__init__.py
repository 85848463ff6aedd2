"""Graph capture and graph rewrites: `capture` (export wrapper), `kv_compress` (the K/V rewrite), `fuse`, and
`split_by_layer` (one submodule per decoder layer, for regional compilation)."""
