"""Hugging Face `transformers` configuration of a Mu model (encoder-decoder or its decoder-only twin).

Standalone (imports only `transformers`): `mu export hf` copies this file next to the weights, so the
directory loads with `trust_remote_code=True` where mu is not installed. The fields are mu's
`MuConfig` fields with the same names and defaults, so a `config.json` written by mu's
`save_pretrained` loads as it is, and `save_pretrained` here writes mu's format back (see `to_diff_dict`).
"""

from transformers import PretrainedConfig

# mu's MuConfig fields and defaults (the paper's 330M model); kept in step with mu/config.py by a test
MU_FIELDS = {
    "n_encoder_layer": 20, "n_decoder_layer": 10, "n_embd": 1024, "qkv_embd": 384, "is_interleaved": False,
    "hidden_dim": 4096, "n_head": 6, "n_kv_head": 3, "block_size": 1024, "dropout": 0.1, "rope_theta": 10000,
    "rope_factor": 1.0, "pad_token_id": 0, "vocab_size": 32128, "arch": "encdec",
}
DECODER_START_ID = 1  # the paper's decoder start token (BOS id 1)


class MuHFConfig(PretrainedConfig):
    model_type = "mu"
    attribute_map = {"hidden_size": "n_embd", "num_attention_heads": "n_head", "num_key_value_heads": "n_kv_head",
                     "intermediate_size": "hidden_dim", "max_position_embeddings": "block_size"}
    # Functions called (no arguments) whenever a config is created. `import mu` puts the registration of
    # its model classes with transformers' Auto classes here: they are imported once a Mu config is used.
    on_create = []

    def __init__(self, n_encoder_layer=20, n_decoder_layer=10, n_embd=1024, qkv_embd=384, is_interleaved=False,
                 hidden_dim=4096, n_head=6, n_kv_head=3, block_size=1024, dropout=0.1, rope_theta=10000,
                 rope_factor=1.0, pad_token_id=0, vocab_size=32128, arch="encdec", mu_format=1, **kwargs):
        if arch not in ("encdec", "deconly"):
            raise ValueError(f"config field 'arch' is {arch!r}; expected 'encdec' or 'deconly'")
        for derived in ("is_encoder_decoder", "tie_word_embeddings"):  # follow from arch / always true
            kwargs.pop(derived, None)
        tokens = {k: kwargs.pop(k, None) for k in ("bos_token_id", "decoder_start_token_id", "eos_token_id")}
        super().__init__(**kwargs)  # first: transformers 5's config is a dataclass that resets its own fields
        self.n_encoder_layer = n_encoder_layer
        self.n_decoder_layer = n_decoder_layer
        self.n_embd = n_embd
        self.qkv_embd = qkv_embd if qkv_embd is not None else n_embd
        self.is_interleaved = is_interleaved
        self.hidden_dim = hidden_dim
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.block_size = block_size
        self.dropout = dropout
        self.rope_theta = rope_theta
        self.rope_factor = rope_factor
        self.vocab_size = vocab_size
        self.arch = arch
        self.mu_format = mu_format
        self.num_hidden_layers = n_decoder_layer  # what generation utilities read as the decoder depth
        # the token ids generation reads (mu's: pad 0, decoder start = BOS 1, no EOS unless given)
        self.pad_token_id = pad_token_id
        self.bos_token_id = DECODER_START_ID if tokens["bos_token_id"] is None else tokens["bos_token_id"]
        self.decoder_start_token_id = (DECODER_START_ID if tokens["decoder_start_token_id"] is None
                                       else tokens["decoder_start_token_id"])
        self.eos_token_id = tokens["eos_token_id"]
        self.is_encoder_decoder = arch == "encdec"
        self.tie_word_embeddings = True
        for fn in MuHFConfig.on_create:
            fn()

    @property
    def head_dim(self) -> int:
        return self.qkv_embd // self.n_head

    def mu_dict(self) -> dict:
        """mu's `MuConfig` fields (what mu's loader reads)."""
        return {k: getattr(self, k) for k in MU_FIELDS}

    def to_diff_dict(self) -> dict:
        """What `save_pretrained` writes: mu's format (model_type, mu_format, MuConfig fields), plus the
        remote-code entries when present, so mu can load a directory saved from transformers."""
        d = {"model_type": self.model_type, "mu_format": self.mu_format, **self.mu_dict()}
        for key in ("auto_map", "custom_pipelines"):  # a remote-code directory's entries
            if getattr(self, key, None):
                d[key] = getattr(self, key)
        return d
