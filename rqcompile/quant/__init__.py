"""The compressed format in plain torch: rotations, codebooks, packing and the reference quantizer."""
