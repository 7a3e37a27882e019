"""Our users' prompt dictionary: vocabulary (data, shipped and overridable) and the builder (pure logic)."""

from shared.prompt_dictionary.builder import BuiltPrompt, build_prompt
from shared.prompt_dictionary.choices import Choices, PromptBuilderRequest
from shared.prompt_dictionary.vocabulary import PromptDictionary, PromptDictionaryError, load_prompt_dictionary

__all__ = ["BuiltPrompt", "Choices", "PromptBuilderRequest", "PromptDictionary", "PromptDictionaryError",
           "build_prompt", "load_prompt_dictionary"]
