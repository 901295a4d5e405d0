"""A `text2text-generation` pipeline for encoder-decoder models: text in, generated text out.

transformers 5 removed its own `text2text-generation` task (it points users to chat models). Mu is an
encoder-decoder, so mu brings the task back: `import mu` registers this class under that name where
transformers lacks it, and `mu export hf` ships this file with a `custom_pipelines` entry, so

    pipeline("text2text-generation", model=DIR)                          # after `import mu`
    pipeline("text2text-generation", model=OUT, trust_remote_code=True)  # an export, without mu

both work. Standalone (imports only `transformers`).
"""

from transformers import Pipeline


class MuText2TextGenerationPipeline(Pipeline):
    _pipeline_calls_generate = True
    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _default_generation_config = None  # the model's generation_config.json

    def __call__(self, inputs, **kwargs):
        """One text -> [{"generated_text": ...}]; a list of texts -> one such dict per text."""
        result = super().__call__(inputs, **kwargs)
        if isinstance(inputs, list) and all(isinstance(r, list) and len(r) == 1 for r in result):
            return [r[0] for r in result]
        return result

    def _sanitize_parameters(self, **generate_kwargs):
        return {}, generate_kwargs, {}

    def preprocess(self, text):
        return self.tokenizer(text, return_tensors="pt")

    def _forward(self, model_inputs, **generate_kwargs):
        prepare = getattr(self, "_prepare_generate_kwargs", None)  # merges the pipeline's generation defaults
        if prepare is not None:
            generate_kwargs = prepare(generate_kwargs)
        return {"output_ids": self.model.generate(**model_inputs, **generate_kwargs)}

    def postprocess(self, model_outputs):
        return [{"generated_text": self.tokenizer.decode(ids, skip_special_tokens=True)}
                for ids in model_outputs["output_ids"]]
