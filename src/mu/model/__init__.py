"""Model definitions: shared layers, the encoder-decoder, the decoder-only twin, the KV cache."""
