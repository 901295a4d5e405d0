"""Model definitions: shared layers, the encoder-decoder, the decoder-only twin, the KV cache.

Importing the package registers both architectures with `mu.model.io` (build, save, load).
"""

from mu.model.decoder_only import MuDecoderOnly
from mu.model.encoder_decoder import MuEncoderDecoder
from mu.model.io import ARCHITECTURES

ARCHITECTURES.update(encdec=MuEncoderDecoder, deconly=MuDecoderOnly)
