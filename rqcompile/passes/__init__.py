"""Graph capture and graph rewrites: `capture` (export wrapper), `kv_compress` (the K/V rewrite), `fuse`."""
