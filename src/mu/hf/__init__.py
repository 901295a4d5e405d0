"""Hugging Face `transformers` interop: mu's model directories load through the Auto classes.

After `import mu`:

    AutoConfig.from_pretrained(DIR)                   # MuHFConfig (model_type "mu")
    AutoModelForSeq2SeqLM.from_pretrained(DIR)        # MuForConditionalGeneration (arch "encdec")
    AutoModelForCausalLM.from_pretrained(DIR)         # MuForCausalLM (arch "deconly")
    pipeline("text2text-generation", model=DIR)       # MuText2TextGenerationPipeline

DIR is what mu's `save_pretrained` / `mu train` writes: the same `model.safetensors`, no conversion.
The classes live in standalone files (`configuration_mu.py`, `modeling_mu.py`, `pipeline_mu.py`, which
import only torch and transformers) so that `mu export hf` (`mu.hf.export`) can copy them next to the
weights for `trust_remote_code=True` loading where mu is not installed.

Registering the model classes means importing transformers' `PreTrainedModel`, which takes seconds;
`import mu` must stay instant (the CLI imports it), and so must loading a tokenizer (which imports
transformers' Auto modules). So registration is staged: `install()` (called by `mu/__init__.py`) adds an
import hook that registers the config class right after `transformers.models.auto.configuration_auto`
loads, and the pipeline right after `transformers.pipelines` loads (at once for what is already
imported); the model classes are registered when the first `MuHFConfig` is created (its `on_create`),
which `AutoModel*.from_pretrained` does before it looks up the model class. `register()` does
everything at once, explicitly.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Callable

MODEL_TYPE = "mu"


def register_config() -> None:
    from transformers import AutoConfig

    from mu.hf.configuration_mu import MuHFConfig

    AutoConfig.register(MODEL_TYPE, MuHFConfig, exist_ok=True)
    if register_models not in MuHFConfig.on_create:
        MuHFConfig.on_create.append(register_models)


def register_models() -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from mu.hf.configuration_mu import MuHFConfig
    from mu.hf.modeling_mu import MuForCausalLM, MuForConditionalGeneration

    if register_models in MuHFConfig.on_create:  # once is enough
        MuHFConfig.on_create.remove(register_models)
    AutoModelForSeq2SeqLM.register(MuHFConfig, MuForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(MuHFConfig, MuForCausalLM, exist_ok=True)


def register_pipeline() -> None:
    """Bring back `text2text-generation` where this transformers lacks it (5.x removed the task)."""
    if "transformers.pipelines" not in sys.modules:
        return  # the hook on transformers.pipelines comes back
    pending = sys.modules.get("mu.hf.pipeline_mu")
    if pending is not None and not hasattr(pending, "MuText2TextGenerationPipeline"):
        return  # pipeline_mu's own `from transformers import Pipeline` got here; its hook comes back
    import transformers.pipelines as pipelines
    from transformers import AutoModelForSeq2SeqLM

    from mu.hf.pipeline_mu import MuText2TextGenerationPipeline

    task = "text2text-generation"
    if task in pipelines.PIPELINE_REGISTRY.get_supported_tasks():
        return  # transformers 4.x has its own
    getattr(pipelines, "REMOVED_TASKS", {}).pop(task, None)
    pipelines.PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=MuText2TextGenerationPipeline,
                                                  pt_model=AutoModelForSeq2SeqLM, type="text")


def register() -> None:
    """Register mu's config, models and pipeline with transformers now."""
    import transformers.pipelines  # noqa: F401  (register_pipeline waits for it otherwise)

    register_config()
    register_models()
    register_pipeline()


HOOKS: dict[str, Callable[[], None]] = {
    "transformers.models.auto.configuration_auto": register_config,
    "transformers.pipelines": register_pipeline,
    "mu.hf.pipeline_mu": register_pipeline,  # imported first, it imports transformers.pipelines itself
}


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs `HOOKS[name]` right after module `name` is first imported (then forgets it)."""

    def __init__(self, hooks: dict[str, Callable[[], None]]):
        self.hooks = dict(hooks)

    def find_spec(self, fullname, path, target=None):
        hook = self.hooks.get(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                del self.hooks[fullname]
                if not self.hooks:
                    sys.meta_path.remove(self)
                spec.loader = _Then(spec.loader, hook)
                return spec
        return None


class _Then(importlib.abc.Loader):
    """A loader that runs `hook` after `loader` has executed the module."""

    def __init__(self, loader, hook: Callable[[], None]):
        self.loader, self.hook = loader, hook

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.hook()

    def __getattr__(self, name):  # get_resource_reader, get_filename, ... of the wrapped loader
        return getattr(self.loader, name)


def install() -> None:
    """Register with transformers now for what it has imported, and on import for the rest (see above)."""
    if importlib.util.find_spec("transformers") is None:
        return
    pending = {}
    for name, hook in HOOKS.items():
        if name in sys.modules:
            hook()
        else:
            pending[name] = hook
    if pending and not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport(pending))
