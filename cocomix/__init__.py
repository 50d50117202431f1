"""CoCoMix reproduction harness. Importing the package registers the "cocomix" model type with
transformers' Auto classes, so `AutoModelForCausalLM.from_pretrained(checkpoint_dir)` works."""

from cocomix.model import CocomixConfig, CocomixForCausalLM, register_auto_classes

register_auto_classes()

__all__ = ["CocomixConfig", "CocomixForCausalLM"]
